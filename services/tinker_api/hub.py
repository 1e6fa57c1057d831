"""A read-only Hugging Face Hub surface for base models' tokenizer files, so that the
official SDK's ``get_tokenizer()`` (``AutoTokenizer.from_pretrained(<tokenizer id>)``)
loads the tokenizer from TenSafe when ``HF_ENDPOINT`` is this service's URL.

Served are exactly the routes ``huggingface_hub`` 2.x calls for a tokenizer (read from
its ``file_download.py`` / ``hf_api.py`` and transformers' ``tokenization_utils_*``):

- ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}``: a file, with the headers
  ``hf_hub_download`` requires (``X-Repo-Commit``, ``ETag``, ``Content-Length``);
- ``GET /api/models/{repo_id}/tree/{revision}[/{path}]``: the file listing
  (``list_repo_files``, ``list_repo_tree``; transformers lists the repository and its
  ``additional_chat_templates/`` folder);
- ``GET /api/models/{repo_id}[/revision/{revision}]``: model info (transformers asks it
  whether a model is a Mistral base model).

A repository is a base model (its registered name is the repo id, which ``get_info``
announces as ``tokenizer_id``), backed by the trainer's ``GetBaseModelTokenizer``: the
fixed list of tokenizer file names beside the base model, never its weights. The
repository's commit is the first 40 hex digits of the files' SHA-256, so a changed
tokenizer is a new commit and ``huggingface_hub``'s cache cannot serve a stale one.

Every route needs the caller's credential, which ``huggingface_hub`` sends as
``Authorization: Bearer <HF_TOKEN>``: a TenSafe JWT (``tensafe token``) or a TenSafe API
key (exchanged at auth, as ``/api/v1/auth/token`` does). A missing file, repository or
revision is a 404 with the Hub's ``X-Error-Code`` (``EntryNotFound``, ``RepoNotFound``,
``RevisionNotFound``), which ``huggingface_hub`` turns into the exception transformers
expects for an optional file that is absent.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from aiohttp import web

from tensafe.common.errors import ErrorCode, TenSafeError
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.tinker_api.backend import Backend
from tensafe.tinker_api.routes import caller_token

_REPO = "{repo_id:[^/]+(?:/[^/]+)*}"
"""A repo id: a base model name, which may be nested (``org/name``)."""

_MAIN = "main"


def _commit(tokenizer: pb.GetBaseModelTokenizerResponse) -> str:
    return tokenizer.sha256[:40]


def _hub_error(status: int, error_code: str, message: str) -> web.Response:
    """The Hub's error shape: ``X-Error-Code`` picks huggingface_hub's exception,
    ``X-Error-Message`` and ``{"error"}`` carry the message."""
    return web.Response(
        status=status,
        text=json.dumps({"error": message}),
        content_type="application/json",
        headers={"X-Error-Code": error_code, "X-Error-Message": message},
    )


class HubRoutes:
    """The Hub routes over ``GetBaseModelTokenizer``.

    Args:
        backend: The trainer's and auth's stubs.
    """

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def table(self) -> list[web.RouteDef]:
        """The routes; the specific ``/api/models`` ones come before the bare model info."""
        return [
            # HEAD too: hf_hub_download reads a file's metadata with HEAD first.
            web.get(f"/{_REPO}/resolve/{{revision}}/{{filename:.+}}", self.resolve),
            web.get(f"/api/models/{_REPO}/tree/{{revision}}/{{path:.+}}", self.tree),
            web.get(f"/api/models/{_REPO}/tree/{{revision}}", self.tree),
            web.get(f"/api/models/{_REPO}/revision/{{revision}}", self.model_info),
            web.get(f"/api/models/{_REPO}", self.model_info),
        ]

    async def _tokenizer(
        self, request: web.Request
    ) -> pb.GetBaseModelTokenizerResponse | web.Response:
        """The repository's files at the requested revision, or the Hub's 401/404."""
        repo_id = request.match_info["repo_id"]
        try:
            token = await self._backend.access_token(caller_token(request))
            tokenizer = await self._backend.base_model_tokenizer(repo_id, token)
        except TenSafeError as error:
            if error.code in (ErrorCode.NOT_FOUND, ErrorCode.INVALID_ARGUMENT):
                return _hub_error(
                    404, "RepoNotFound", f"{repo_id} is not a base model served by TenSafe"
                )
            raise
        revision = request.match_info.get("revision", _MAIN)
        if revision not in (_MAIN, _commit(tokenizer)):
            return _hub_error(
                404,
                "RevisionNotFound",
                f"{repo_id} has the revisions {_MAIN!r} and {_commit(tokenizer)!r} only",
            )
        return tokenizer

    async def resolve(self, request: web.Request) -> web.Response:
        """A tokenizer file (``hf_hub_download``)."""
        tokenizer = await self._tokenizer(request)
        if isinstance(tokenizer, web.Response):
            return tokenizer
        filename = request.match_info["filename"]
        for file in tokenizer.files:
            if file.name == filename:
                return web.Response(
                    body=file.content,
                    content_type="application/octet-stream",
                    headers={
                        "ETag": f'"{hashlib.sha256(file.content).hexdigest()}"',
                        "X-Repo-Commit": _commit(tokenizer),
                    },
                )
        return _hub_error(
            404,
            "EntryNotFound",
            f"{filename} is not a tokenizer file of {request.match_info['repo_id']} "
            "(TenSafe serves tokenizer files only, never weights)",
        )

    async def tree(self, request: web.Request) -> web.Response:
        """The file listing; the files are flat, so any folder is empty (404, as the Hub
        answers for a missing folder)."""
        tokenizer = await self._tokenizer(request)
        if isinstance(tokenizer, web.Response):
            return tokenizer
        if request.match_info.get("path", "").strip("/"):
            return _hub_error(404, "EntryNotFound", f"{request.match_info['path']} does not exist")
        return web.Response(
            text=json.dumps([_entry(file) for file in tokenizer.files]),
            content_type="application/json",
        )

    async def model_info(self, request: web.Request) -> web.Response:
        """Model info: id, commit and files; no tags (so not a Mistral base model)."""
        tokenizer = await self._tokenizer(request)
        if isinstance(tokenizer, web.Response):
            return tokenizer
        repo_id = request.match_info["repo_id"]
        return web.Response(
            text=json.dumps(
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": _commit(tokenizer),
                    "private": True,
                    "tags": [],
                    "siblings": [{"rfilename": file.name} for file in tokenizer.files],
                }
            ),
            content_type="application/json",
        )


def _entry(file: pb.TokenizerFile) -> dict[str, Any]:
    """A tree entry as the Hub lists one (``oid`` is a blob id; ours is content's)."""
    return {
        "type": "file",
        "path": file.name,
        "size": len(file.content),
        "oid": hashlib.sha1(file.content, usedforsecurity=False).hexdigest(),
    }
