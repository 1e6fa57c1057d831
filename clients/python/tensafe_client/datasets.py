"""SDK for server-held datasets: upload JSONL, and train on it with server Poisson sampling.

Server-side sampling is the only way of training that earns privacy amplification by
subsampling (docs/privacy.md): the server holds the records, draws every batch by
Poisson sampling and composes ``PoissonSampledDpEvent`` steps. Batches handed in by the
client are accounted as full Gaussian steps.

Example::

    from tinker import ServiceClient
    from tensafe.client.datasets import DatasetClient

    service = ServiceClient()
    datasets = DatasetClient(service.rpc)
    dataset = datasets.upload(
        "train.jsonl", name="arith", base_model="tiny-llama", record_format="prompt_completion"
    )
    client = service.create_lora_training_client("tiny-llama", rank=8, dp_noise_multiplier=1.0)
    run = datasets.train_on_dataset(
        client.model_id, dataset.id, sample_rate=0.01, steps=1000, learning_rate=1e-3
    )
    result = run.result(on_progress=lambda spent: print(spent.steps, spent.epsilon))
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from tensafe.client.training import TrainerRpc, future_error, new_request_id
from tensafe.common.errors import InvalidArgument, TenSafeError, Unavailable
from tensafe.common.grpc_errors import from_rpc_error
from tensafe.proto.common.v1 import common_pb2
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb

CHUNK_BYTES = 1 << 20
"""Bytes per UploadDataset message (well under the default 16 MiB message limit)."""

_FORMATS = {
    "text": pb.DATASET_FORMAT_TEXT,
    "prompt_completion": pb.DATASET_FORMAT_PROMPT_COMPLETION,
}


def _chunks(source: bytes | str | os.PathLike[str], size: int) -> Iterator[bytes]:
    if isinstance(source, bytes):
        for start in range(0, len(source), size):
            yield source[start : start + size]
        return
    with Path(source).open("rb") as stream:
        while chunk := stream.read(size):
            yield chunk


class TrainOnDatasetRun:
    """A TrainOnDataset run on the server: poll its progress, wait for its result.

    Args:
        rpc: The trainer connection.
        training_client_id: The client being trained.
        future: The run's future as the server returned it.
    """

    def __init__(self, rpc: TrainerRpc, training_client_id: str, future: common_pb2.Future):
        self._rpc = rpc
        self._client_id = training_client_id
        self.future_id = future.id

    def privacy_spent(self) -> pb.PrivacySpent:
        """Privacy spent so far: every committed step of the run is already counted."""
        return self._rpc.get_privacy_spent(self._client_id)

    def result(
        self,
        *,
        timeout: float | None = None,
        on_progress: Callable[[pb.PrivacySpent], None] | None = None,
    ) -> pb.TrainOnDatasetResult:
        """Wait for the run to finish.

        Args:
            timeout: Seconds to wait at most (None: no limit).
            on_progress: Called with the privacy spent after each wait slice.

        Returns:
            Per-step losses (NaN for an empty batch) and batch sizes, and the privacy
            spent at the end.

        Raises:
            TenSafeError: The run failed (its typed error), or ``Unavailable`` when the
                timeout passed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = (
                self._rpc.options.wait_slice_seconds
                if deadline is None
                else max(0.0, deadline - time.monotonic())
            )
            future = self._rpc.wait_future(self.future_id, remaining)
            if future.status == common_pb2.FUTURE_STATUS_SUCCEEDED:
                result = pb.TrainOnDatasetResult()
                future.result.Unpack(result)
                return result
            if future.status == common_pb2.FUTURE_STATUS_FAILED:
                raise future_error(future.error)
            if future.status == common_pb2.FUTURE_STATUS_CANCELLED:
                raise TenSafeError(f"run {self.future_id} was cancelled")
            if on_progress is not None:
                on_progress(self.privacy_spent())
            if deadline is not None and time.monotonic() >= deadline:
                raise Unavailable(f"run {self.future_id} did not finish in {timeout} s")

    def cancel(self) -> None:
        """Stop the run after its current step (committed steps stay)."""
        self._rpc.cancel_future(self.future_id)


class DatasetClient:
    """Upload, list and delete server-held datasets and train on them.

    Args:
        rpc: The trainer connection (e.g. ``ServiceClient().rpc``).
        chunk_bytes: Bytes per upload message.
    """

    def __init__(self, rpc: TrainerRpc, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        if chunk_bytes < 1:
            raise InvalidArgument("chunk_bytes", "must be positive")
        self._rpc = rpc
        self._chunk_bytes = chunk_bytes

    def upload(
        self,
        source: bytes | str | os.PathLike[str],
        *,
        name: str,
        base_model: str,
        record_format: str,
        request_id: str | None = None,
    ) -> pb.Dataset:
        """Upload a JSONL dataset (bytes or a file path), streamed in chunks.

        Args:
            source: JSONL bytes, or the path of a JSONL file.
            name: Dataset name, ``[A-Za-z0-9._-]{1,64}``.
            base_model: Base model whose tokenizer the server uses.
            record_format: ``"text"`` or ``"prompt_completion"``.
            request_id: Idempotency key (default: a new one).

        Returns:
            The stored dataset (records and tokens counted by the server).

        Raises:
            InvalidArgument: A bad record (the field names its line), an empty dataset.
        """
        if record_format not in _FORMATS:
            raise InvalidArgument("record_format", f"must be one of {sorted(_FORMATS)}")
        header = pb.UploadDatasetHeader(
            name=name,
            base_model=base_model,
            format=_FORMATS[record_format],
            request_id=request_id or new_request_id(),
        )

        def messages() -> Iterator[pb.UploadDatasetRequest]:
            yield pb.UploadDatasetRequest(header=header)
            for chunk in _chunks(source, self._chunk_bytes):
                yield pb.UploadDatasetRequest(chunk=chunk)

        try:
            response = self._rpc.trainer_stub.UploadDataset(
                messages(), timeout=self._rpc.options.call_timeout_seconds
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        dataset: pb.Dataset = response.dataset
        return dataset

    def get(self, dataset_id: str) -> pb.Dataset:
        """A dataset's metadata."""
        request = pb.GetDatasetRequest(dataset_id=dataset_id)
        dataset: pb.Dataset = self._rpc.call(self._rpc.trainer_stub.GetDataset, request).dataset
        return dataset

    def list(self) -> list[pb.Dataset]:
        """Every dataset of the caller's tenant, newest first."""
        datasets: list[pb.Dataset] = []
        token = ""
        while True:
            response = self._rpc.call(
                self._rpc.trainer_stub.ListDatasets, pb.ListDatasetsRequest(page_token=token)
            )
            datasets.extend(response.datasets)
            token = response.next_page_token
            if not token:
                return datasets

    def delete(self, dataset_id: str) -> None:
        """Delete a dataset (its ciphertext is removed)."""
        self._rpc.call(
            self._rpc.trainer_stub.DeleteDataset, pb.DeleteDatasetRequest(dataset_id=dataset_id)
        )

    def train_on_dataset(
        self,
        training_client_id: str,
        dataset_id: str,
        *,
        steps: int,
        learning_rate: float,
        sample_rate: float | None = None,
        expected_batch_size: float | None = None,
        adam: pb.AdamParams | None = None,
        request_id: str | None = None,
    ) -> TrainOnDatasetRun:
        """Start DP-SGD on a server-held dataset with server-drawn Poisson batches.

        Args:
            training_client_id: A private training client on the dataset's base model.
            dataset_id: The dataset.
            steps: Optimizer steps.
            learning_rate: Adam learning rate (ignored when ``adam`` is given).
            sample_rate: Poisson rate q in (0, 1] ...
            expected_batch_size: ... or q · N.
            adam: Full Adam parameters.
            request_id: Idempotency key (default: a new one).

        Returns:
            The run.

        Raises:
            InvalidArgument: Bad rate or steps.
            BudgetExhausted: The run would exceed the client's privacy budget.
        """
        if (sample_rate is None) == (expected_batch_size is None):
            raise InvalidArgument("rate", "give exactly one of sample_rate, expected_batch_size")
        request = pb.TrainOnDatasetRequest(
            training_client_id=training_client_id,
            dataset_id=dataset_id,
            steps=steps,
            adam_params=adam or pb.AdamParams(learning_rate=learning_rate),
            request_id=request_id or new_request_id(),
        )
        if sample_rate is not None:
            request.sample_rate = sample_rate
        else:
            assert expected_batch_size is not None
            request.expected_batch_size = expected_batch_size
        future = self._rpc.submit("TrainOnDataset", request)
        return TrainOnDatasetRun(self._rpc, training_client_id, future)
