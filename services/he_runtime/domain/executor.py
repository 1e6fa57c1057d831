"""HE-LoRA executor: applies a compiled plan to encrypted activations (server side).

An executor is one client session: the client's CKKS parameters and the Galois keys it
uploaded, both as wire bytes. It never holds a secret key and cannot decrypt. For each
adapter it pre-encodes the plaintexts a plan layout needs once (bounded LRU cache keyed
by adapter and :meth:`~tensafe.helora.plan.Plan.encoding_key`), then evaluates requests:
validates the ciphertexts, applies the plan through a :class:`CountingEvaluator` that
counts every SEAL operation it performs, and returns the framed results with the
counts, which must equal the plan's.

Overflow safety. CKKS wraps silently modulo q when a value outgrows its modulus, so
the executor bounds every intermediate from the weights and the plan's activation
bound (which the client checks before encrypting) and refuses an adapter whose worst
case does not fit (FailedPrecondition), instead of returning garbage.

Zero weights. SEAL refuses to produce a *transparent* ciphertext (one whose second
polynomial is zero), which a product with an all-zero plaintext is. A weight (or a
whole diagonal) that encodes to zero is therefore encoded as the smallest non-zero
plaintext, one unit at the plaintext's scale: an error of at most 1/scale, the same
order as the encoding's own rounding, and the operation counts stay independent of the
weights.

Parallelism. seal-python keeps the GIL during every SEAL call, so threads give no
parallel speed-up. Given :class:`~tensafe.he_runtime.domain.parallel.EvaluationPeers`, an
executor opens its session in a peer process too and splits each request: several
units (ciphertexts or token groups) half and half; one PER_TOKEN CLIENT_BABY_STEPS unit
by giant steps of x·A and by baby steps of u·B, the parts that do not depend on each
other (the fold in between is a chain of dependent rotations and stays in this
process); one BATCH_FIRST token group by input features of x·A (the partial sums are
added before the rescale) and by output features of u·B. The peer's counted
operations are added to this process's, and the sum equals the plan.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import seal

from tensafe.common.errors import FailedPrecondition, InvalidArgument
from tensafe.helora import packing
from tensafe.helora.ckks import CkksContext, ParmsId
from tensafe.helora.params import CkksParams
from tensafe.helora.plan import (
    OpCounts,
    Packing,
    Plan,
    Variant,
    one_prime_layout,
    shared_input_offsets,
)
from tensafe.helora.wire import WireKind, pack, unpack

if TYPE_CHECKING:
    from tensafe.he_runtime.domain.parallel import EvaluationPeers, PeerWorker

#: Fewest bits of fixed-point precision (relative to the largest entry of B) a
#: BATCH_FIRST adapter may be encoded with; below this the 1e-3 accuracy target fails.
MIN_FIXED_POINT_BITS = 12
#: Headroom bits kept free at the top of every modulus: one for the sign, one for noise
#: and rounding on top of the worst-case value bound.
_HEADROOM_BITS = 2

FloatArray = npt.NDArray[np.float64]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraWeights:
    """The adapter weights of one layer, in the delta's orientation.

    Attributes:
        lora_a: A, shape [d, r].
        lora_b: B, shape [r, d_out].
    """

    lora_a: FloatArray
    lora_b: FloatArray

    @classmethod
    def from_peft(
        cls, *, lora_a_weight: npt.ArrayLike, lora_b_weight: npt.ArrayLike
    ) -> LoraWeights:
        """Build from PEFT tensors: ``lora_A.weight`` is [r, d], ``lora_B.weight`` [d_out, r]."""
        return cls(
            lora_a=np.asarray(lora_a_weight, dtype=np.float64).T.copy(),
            lora_b=np.asarray(lora_b_weight, dtype=np.float64).T.copy(),
        )


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class EncodedAdapter:
    """An adapter's plaintexts for one plan layout (see ``Plan.encoding_key``).

    Attributes:
        encoding_key: The plan layout the plaintexts were made for.
        input_diagonals: PER_TOKEN x·A plaintexts ``[giant][baby]`` (empty for batch).
        output_diagonals: PER_TOKEN u·B plaintexts ``[giant][baby]`` (empty for batch).
        lora_a_values: BATCH_FIRST A entries as they will be encoded (zero-free).
        lora_a_scale: Scale of the A plaintexts (the exact prime a rescale drops).
        lora_b_values: BATCH_FIRST (alpha/r)·B entries as they will be encoded.
        lora_b_scale: Fixed-point scale of the B plaintexts.
        output_bound: Worst-case |delta| given the plan's activation bound.
        fixed_point_bits: BATCH_FIRST: log2(scale · max|B|), the precision B keeps.
        peer_id: Names the same encoding in the session's peer process.
    """

    encoding_key: str
    input_diagonals: tuple[tuple[Any, ...], ...] = ()
    output_diagonals: tuple[tuple[Any, ...], ...] = ()
    lora_a_values: FloatArray | None = None
    lora_a_scale: float = 0.0
    lora_b_values: FloatArray | None = None
    lora_b_scale: float = 0.0
    output_bound: float = 0.0
    fixed_point_bits: float = math.inf
    peer_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExecutionResult:
    """The framed result ciphertexts of one request and what producing them took.

    Attributes:
        ciphertexts: ``plan.output_ciphertexts`` framed ciphertexts, in plan order.
        counts: The SEAL operations actually performed.
    """

    ciphertexts: tuple[bytes, ...]
    counts: OpCounts


class CountingEvaluator:
    """A SEAL evaluator that counts each operation it performs.

    Every homomorphic operation of the executor goes through here, so the counts are
    what ran, not what was planned.
    """

    def __init__(self, context: CkksContext, galois_keys: Any) -> None:
        self._context = context
        self._evaluator = seal.Evaluator(context.seal_context)
        self._galois_keys = galois_keys
        self._counts: collections.Counter[str] = collections.Counter()

    def counts(self) -> OpCounts:
        """Return the operations performed so far."""
        return OpCounts(**{name: self._counts[name] for name in OpCounts.__dataclass_fields__})

    def rotate(self, ciphertext: Any, step: int) -> Any:
        """Rotate left by ``step`` slots (one key switch: the key for ``step`` exists)."""
        self._counts["rotations"] += 1
        self._counts["key_switches"] += 1
        return self._evaluator.rotate_vector(ciphertext, step, self._galois_keys)

    def multiply_plain(self, ciphertext: Any, plaintext: Any) -> Any:
        """Return ciphertext * plaintext."""
        self._counts["multiply_plain"] += 1
        return self._evaluator.multiply_plain(ciphertext, plaintext)

    def add_inplace(self, target: Any, other: Any) -> None:
        """Add ``other`` into ``target``."""
        self._counts["additions"] += 1
        self._evaluator.add_inplace(target, other)

    def absorb(self, counts: OpCounts) -> None:
        """Add operations another process performed for this request."""
        for name, value in counts.to_dict().items():
            self._counts[name] += value

    def rescale_inplace(self, ciphertext: Any) -> None:
        """Rescale, dropping the last data prime."""
        self._counts["rescales"] += 1
        self._evaluator.rescale_to_next_inplace(ciphertext)

    def encode_scalar(self, value: float, scale: float, level: ParmsId) -> Any:
        """Encode a scalar plaintext and switch it to ``level``."""
        self._counts["plaintext_encodes"] += 1
        plain = self._context.encoder.encode(value, scale)
        self._evaluator.mod_switch_to_inplace(plain, list(level))
        return plain


class HeLoraExecutor:
    """Evaluates HE-LoRA plans for one client session, with public material only.

    Args:
        parameters: Framed :data:`WireKind.PARAMETERS` from the client.
        galois_keys: Framed :data:`WireKind.GALOIS_KEYS`, or None (enough for plans that
            need no rotation).
        max_cached_adapters: Encoded adapters kept (least recently used evicted).
        peers: Worker processes to share each request with (see the module docstring,
            "Parallelism"); None: every operation runs in this process.

    Raises:
        InvalidArgument: A blob is malformed, the parameters are insecure or
            inconsistent with their fingerprint, or the keys do not parse.
        FailedPrecondition: The Galois keys belong to another parameter set.
    """

    def __init__(
        self,
        *,
        parameters: bytes,
        galois_keys: bytes | None,
        max_cached_adapters: int = 8,
        peers: EvaluationPeers | None = None,
    ) -> None:
        if max_cached_adapters < 1:
            raise InvalidArgument("max_cached_adapters", "must be at least 1")
        frame = unpack(parameters, field="parameters", expected=WireKind.PARAMETERS)
        try:
            decoded = json.loads(frame.payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InvalidArgument("parameters", "payload is not JSON") from None
        params = CkksParams.from_dict(decoded, field_prefix="parameters.")
        self._context = CkksContext(params)
        if frame.fingerprint != self._context.fingerprint:
            raise InvalidArgument(
                "parameters",
                "fingerprint does not match the SEAL parameters this runtime derives from "
                "the parameter set (client and runtime SEAL builds differ)",
            )
        self._galois_keys: Any = None
        if galois_keys is not None:
            keys_frame = unpack(galois_keys, field="galois_keys", expected=WireKind.GALOIS_KEYS)
            self._check_fingerprint(keys_frame.fingerprint, "galois_keys")
            try:
                self._galois_keys = self._context.seal_context.from_galois_str(keys_frame.payload)
            except (ValueError, RuntimeError) as error:
                raise InvalidArgument("galois_keys", f"not valid Galois keys: {error}") from None
        self._max_cached_adapters = max_cached_adapters
        self._adapters: collections.OrderedDict[tuple[str, str], EncodedAdapter] = (
            collections.OrderedDict()
        )
        self._peer: PeerWorker | None = None
        self._peer_session = uuid.uuid4().hex
        if peers is not None:
            worker = peers.worker()
            worker.call(("open", self._peer_session, parameters, galois_keys))
            self._peer = worker
            # Deferred, not sent: a finalizer may run while this thread holds the pipe.
            weakref.finalize(self, worker.defer, ("close", self._peer_session))

    @property
    def params(self) -> CkksParams:
        """The session's parameter set."""
        return self._context.params

    def check_plan(self, plan: Plan) -> None:
        """Check that this session can run ``plan``.

        Raises:
            FailedPrecondition: The plan is for another parameter set, or a Galois key
                for one of its rotation steps was not uploaded.
        """
        if plan.params != self._context.params:
            raise FailedPrecondition(
                "the plan was compiled for another CKKS parameter set than the session's",
                reason="PARAMETER_SET_MISMATCH",
            )
        for step in plan.rotation_steps:
            element = self._context.galois_element(step)
            if self._galois_keys is None or not self._galois_keys.has_key(element):
                raise FailedPrecondition(
                    f"no Galois key for rotation step {step}; upload the keys for the plan's "
                    f"rotation_steps",
                    reason="GALOIS_KEY_MISSING",
                    metadata={"step": str(step)},
                )

    def refuse_unneeded_keys(self, plan: Plan) -> None:
        """Refuse Galois keys for rotation steps ``plan`` does not need (key hygiene).

        A session holds exactly the evaluation keys of its plan: a key the plan never
        uses is tenant key material kept for nothing (and would let a later plan rotate
        by a step the client did not agree to), so it is refused rather than ignored.

        Raises:
            InvalidArgument: ``galois_keys`` holds a key for another step (the message
                and the ``step`` metadata name it; a non-rotation automorphism such as
                complex conjugation is named by its Galois element).
        """
        if self._galois_keys is None:
            return
        degree = self._context.params.poly_modulus_degree
        needed = {self._context.galois_element(step) for step in plan.rotation_steps}
        slots = degree // 2
        steps_by_element = {pow(3, step, 2 * degree): step for step in range(1, slots)}
        for element in range(1, 2 * degree, 2):
            if element in needed or not self._galois_keys.has_key(element):
                continue
            step = steps_by_element.get(element)
            if step is None:
                raise InvalidArgument(
                    "galois_keys",
                    f"holds a key for Galois element {element}, which is not a rotation the "
                    f"plan needs (its rotation_steps are {list(plan.rotation_steps)})",
                    metadata={"galois_element": str(element)},
                )
            # SEAL names a right rotation by k as the left rotation by slots - k.
            named = step if step <= slots // 2 else step - slots
            raise InvalidArgument(
                "galois_keys",
                f"holds a key for rotation step {named}, which the plan does not need "
                f"(its rotation_steps are {list(plan.rotation_steps)}); upload exactly "
                f"the plan's keys",
                metadata={"step": str(named)},
            )

    def adapter(
        self,
        plan: Plan,
        adapter_key: str,
        load_weights: Callable[[], LoraWeights | Sequence[LoraWeights]],
    ) -> EncodedAdapter:
        """Return the adapter's plaintexts for ``plan``, encoding them on first use.

        Args:
            plan: The plan (only its layout matters, not its token count).
            adapter_key: Identifies the weights (e.g. adapter id and version digest).
            load_weights: Called only when the encoding is not cached.
        """
        key = (adapter_key, plan.encoding_key())
        cached = self._adapters.get(key)
        if cached is not None:
            self._adapters.move_to_end(key)
            return cached
        encoded = self.encode_adapter(plan, load_weights())
        self._adapters[key] = encoded
        while len(self._adapters) > self._max_cached_adapters:
            self._adapters.popitem(last=False)
        return encoded

    def encode_adapter(
        self, plan: Plan, weights: LoraWeights | Sequence[LoraWeights]
    ) -> EncodedAdapter:
        """Pre-encode an adapter's plaintexts for a plan layout.

        Args:
            plan: The plan layout.
            weights: One layer's weights; or the weights of several layers that read one
                input, evaluated together in one PER_TOKEN ciphertext (each in its
                region of slots, :func:`~tensafe.helora.plan.shared_input_offsets`;
                ``plan.output_size`` must then be the end of the last region's outputs).

        Raises:
            InvalidArgument: The weights do not have the plan's shapes or are not finite,
                or the layers do not fit one ciphertext.
            FailedPrecondition: With the plan's activation bound the delta could
                overflow the modulus, or B would keep too little fixed-point precision.
        """
        self.check_plan(plan)
        if isinstance(weights, LoraWeights):
            lora_a, scaled_b = _checked_weights(plan, weights)
            if plan.packing is Packing.PER_TOKEN:
                encoded = self._encode_per_token(plan, [lora_a], [scaled_b], None)
            else:
                encoded = self._encode_batch_first(plan, lora_a, scaled_b)
            peer_a: Any = np.asarray(weights.lora_a, dtype=np.float64)
            peer_b: Any = np.asarray(weights.lora_b, dtype=np.float64)
        else:
            layers = list(weights)
            sizes = [int(np.shape(layer.lora_b)[1]) for layer in layers]
            offsets = shared_input_offsets(plan, sizes)
            if offsets is None or offsets[-1] + sizes[-1] != plan.output_size:
                raise InvalidArgument(
                    "weights",
                    f"{len(layers)} layers of output sizes {sizes} do not share one "
                    f"ciphertext of this plan (output_size {plan.output_size})",
                )
            checked = [
                _checked_weights(dataclasses.replace(plan, output_size=size), layer)
                for layer, size in zip(layers, sizes, strict=True)
            ]
            encoded = self._encode_per_token(
                plan, [a for a, _ in checked], [b for _, b in checked], offsets
            )
            peer_a = [np.asarray(layer.lora_a, dtype=np.float64) for layer in layers]
            peer_b = [np.asarray(layer.lora_b, dtype=np.float64) for layer in layers]
        if self._peer is not None:
            # The peer encodes the same plaintexts now, so no request waits for it.
            self._peer.call(
                (
                    "adapter",
                    self._peer_session,
                    encoded.peer_id,
                    plan.to_json(),
                    peer_a,
                    peer_b,
                )
            )
            weakref.finalize(
                encoded, self._peer.defer, ("drop_adapter", self._peer_session, encoded.peer_id)
            )
        return encoded

    def apply(
        self, plan: Plan, adapter: EncodedAdapter, ciphertexts: Sequence[bytes]
    ) -> ExecutionResult:
        """Evaluate the LoRA delta on the client's ciphertexts.

        Raises:
            InvalidArgument: Wrong number of ciphertexts, or one is malformed, at the
                wrong level or scale, or transparent.
            FailedPrecondition: Plan/session/adapter mismatch, a missing Galois key, or
                a ciphertext made under another parameter set.
        """
        self.check_plan(plan)
        if adapter.encoding_key != plan.encoding_key():
            raise FailedPrecondition(
                "the adapter was encoded for another plan layout", reason="PLAN_MISMATCH"
            )
        inputs, payloads = self._load_inputs(plan, ciphertexts)
        evaluator = CountingEvaluator(self._context, self._galois_keys)
        per_unit = plan.input_copies
        peer = self._peer
        if peer is not None and plan.units >= 2:
            # Independent units: the peer takes the second half.
            mine = (plan.units + 1) // 2
            pending = peer.submit(self._task(plan, adapter, "units", payloads[mine * per_unit :]))
            try:
                outputs = self._units(plan, adapter, evaluator, inputs[: mine * per_unit])
            finally:
                theirs = self._absorb(evaluator, pending.result())
            outputs.extend(theirs)
        elif (
            peer is not None
            and plan.packing is Packing.PER_TOKEN
            and plan.variant is Variant.CLIENT_BABY_STEPS
        ):
            outputs = [self._split_unit(plan, adapter, evaluator, inputs, payloads, peer)]
        elif peer is not None and plan.packing is Packing.BATCH_FIRST:
            outputs = self._split_group(plan, adapter, evaluator, inputs, payloads, peer)
        else:
            outputs = self._units(plan, adapter, evaluator, inputs)
        return self._result(outputs, evaluator)

    def apply_layers(
        self, layers: Sequence[tuple[Plan, EncodedAdapter]], ciphertexts: Sequence[bytes]
    ) -> list[ExecutionResult]:
        """Evaluate several layers (plan and adapter each) on the same ciphertexts.

        With a peer process the layers go in pairs: the peer evaluates the second layer
        of a pair whole while this process evaluates the first (no hand-off inside a
        layer, so a layer's chain of dependent rotations never waits for the other
        core); an unpaired last layer is :meth:`apply` (split inside the layer). Without
        a peer, one after the other. Each result's counts are its own layer's.

        Raises:
            As :meth:`apply`.
        """
        peer = self._peer
        results: list[ExecutionResult] = []
        index = 0
        while index < len(layers):
            if peer is None or index + 1 == len(layers):
                plan, adapter = layers[index]
                results.append(self.apply(plan, adapter, ciphertexts))
                index += 1
                continue
            (mine, my_adapter), (theirs, their_adapter) = layers[index], layers[index + 1]
            for plan, adapter in (layers[index], layers[index + 1]):
                self.check_plan(plan)
                if adapter.encoding_key != plan.encoding_key():
                    raise FailedPrecondition(
                        "the adapter was encoded for another plan layout", reason="PLAN_MISMATCH"
                    )
            inputs, payloads = self._load_inputs(mine, ciphertexts)
            self._load_inputs(theirs, ciphertexts)  # validated against its plan too
            their_counts = CountingEvaluator(self._context, self._galois_keys)
            pending = peer.submit(self._task(theirs, their_adapter, "units", payloads))
            evaluator = CountingEvaluator(self._context, self._galois_keys)
            try:
                outputs = self._units(mine, my_adapter, evaluator, inputs)
            finally:
                their_outputs = self._absorb(their_counts, pending.result())
            results.append(self._result(outputs, evaluator))
            results.append(self._result(their_outputs, their_counts))
            index += 2
        return results

    def _result(self, outputs: Sequence[Any], evaluator: CountingEvaluator) -> ExecutionResult:
        blobs = tuple(
            pack(WireKind.CIPHERTEXT, self._context.fingerprint, ct.to_string()) for ct in outputs
        )
        return ExecutionResult(ciphertexts=blobs, counts=evaluator.counts())

    def run_task(
        self, plan: Plan, adapter: EncodedAdapter, task: str, arguments: Any
    ) -> tuple[list[bytes], dict[str, int]]:
        """Run a peer's part of a request (in the peer process; see :meth:`apply`).

        Args:
            plan: The request's plan.
            adapter: This process's encoding of the request's adapter.
            task: ``units`` (whole units), ``x_giant`` (some giant steps of x·A),
                ``u_baby`` (some baby steps of u·B), ``batch_upper`` (x·A over some
                input features) or ``batch_lower`` (u·B for some output features).
            arguments: The task's ciphertexts (SEAL bytes) and indices.

        Returns:
            The resulting ciphertexts as SEAL bytes and the operations performed.
        """
        evaluator = CountingEvaluator(self._context, self._galois_keys)
        if task == "units":
            outputs = self._units(plan, adapter, evaluator, self._load_raw(arguments))
        elif task == "x_giant":
            payloads, giants = arguments
            outputs = [
                _giant_steps(
                    evaluator,
                    self._load_raw(payloads),
                    adapter.input_diagonals,
                    plan.baby_steps,
                    giants,
                )
            ]
        elif task == "batch_upper":
            payloads, features = arguments
            outputs = self._batch_upper(
                plan, adapter, evaluator, self._load_raw(payloads), features
            )
        elif task == "batch_lower":
            payloads, features = arguments
            inner = self._load_raw(payloads)
            outputs = self._batch_lower(plan, adapter, evaluator, inner, features)
        elif task == "u_baby":
            payload, babies = arguments
            outputs = _baby_partials(
                evaluator, self._load_raw([payload])[0], adapter.output_diagonals, babies
            )
        else:
            raise InvalidArgument("task", f"unknown task {task!r}")
        return [ciphertext.to_string() for ciphertext in outputs], evaluator.counts().to_dict()

    def _task(
        self, plan: Plan, adapter: EncodedAdapter, task: str, arguments: Any
    ) -> tuple[Any, ...]:
        return ("task", self._peer_session, adapter.peer_id, plan.to_json(), task, arguments)

    def _absorb(
        self, evaluator: CountingEvaluator, reply: tuple[list[bytes], dict[str, int]]
    ) -> list[Any]:
        blobs, counts = reply
        evaluator.absorb(OpCounts(**counts))
        return self._load_raw(blobs)

    def _load_raw(self, blobs: Sequence[bytes]) -> list[Any]:
        # Ciphertexts between this runtime's own processes (already checked on entry).
        loaded = []
        for blob in blobs:
            ciphertext = seal.Ciphertext()
            ciphertext.load_bytes(self._context.seal_context, blob)
            loaded.append(ciphertext)
        return loaded

    def _units(
        self, plan: Plan, adapter: EncodedAdapter, evaluator: CountingEvaluator, inputs: list[Any]
    ) -> list[Any]:
        per_unit = plan.input_copies
        outputs: list[Any] = []
        for start in range(0, len(inputs), per_unit):
            unit = inputs[start : start + per_unit]
            if plan.packing is Packing.PER_TOKEN:
                outputs.append(self._per_token_unit(plan, adapter, evaluator, unit))
            else:
                outputs.extend(self._batch_group(plan, adapter, evaluator, unit))
        return outputs

    def _split_unit(
        self,
        plan: Plan,
        adapter: EncodedAdapter,
        evaluator: CountingEvaluator,
        copies: list[Any],
        payloads: list[bytes],
        peer: PeerWorker,
    ) -> Any:
        """One CLIENT_BABY_STEPS unit on two cores (same operations as the serial one).

        x·A: the peer sums the second half of the giant steps, this process the first.
        The fold is a chain of dependent rotations and runs here. u·B: the peer makes
        the second half of u's baby-step copies and their products for every giant step,
        this process the first half; the giant-step rotations run here.
        """
        giants = list(range(plan.giant_steps))
        half = (len(giants) + 1) // 2
        pending = (
            peer.submit(self._task(plan, adapter, "x_giant", (payloads, giants[half:])))
            if giants[half:]
            else None
        )
        try:
            inner = _giant_steps(
                evaluator, copies, adapter.input_diagonals, plan.baby_steps, giants[:half]
            )
        finally:
            theirs = self._absorb(evaluator, pending.result()) if pending is not None else []
        for partial in theirs:
            evaluator.add_inplace(inner, partial)
        _fold(plan, evaluator, inner)
        babies = list(range(plan.output_baby_steps))
        half = (len(babies) + 1) // 2
        pending = (
            peer.submit(self._task(plan, adapter, "u_baby", (inner.to_string(), babies[half:])))
            if babies[half:]
            else None
        )
        try:
            partials = _baby_partials(evaluator, inner, adapter.output_diagonals, babies[:half])
        finally:
            theirs = self._absorb(evaluator, pending.result()) if pending is not None else []
        for partial, their in zip(partials, theirs, strict=False):
            evaluator.add_inplace(partial, their)
        return _sum_giant_partials(evaluator, partials, plan.output_baby_steps)

    # -- validation ----------------------------------------------------------------

    def _check_fingerprint(self, fingerprint: bytes, field: str) -> None:
        if fingerprint != self._context.fingerprint:
            raise FailedPrecondition(
                f"{field} was made under another CKKS parameter set than the session's",
                reason="PARAMETER_SET_MISMATCH",
                metadata={"field": field},
            )

    def _load_inputs(
        self, plan: Plan, ciphertexts: Sequence[bytes]
    ) -> tuple[list[Any], list[bytes]]:
        if len(ciphertexts) != plan.input_ciphertexts:
            raise InvalidArgument(
                "ciphertexts",
                f"got {len(ciphertexts)} ciphertexts, the plan takes {plan.input_ciphertexts}",
            )
        level = self._context.parms_id_for_primes(plan.input_primes)
        scale = 2.0**plan.input_scale_bits
        loaded: list[Any] = []
        payloads: list[bytes] = []
        for index, blob in enumerate(ciphertexts):
            field = f"ciphertexts[{index}]"
            frame = unpack(blob, field=field, expected=WireKind.CIPHERTEXT)
            self._check_fingerprint(frame.fingerprint, field)
            ciphertext = seal.Ciphertext()
            try:
                ciphertext.load_bytes(self._context.seal_context, frame.payload)
            except (ValueError, RuntimeError) as error:
                raise InvalidArgument(field, f"not a valid ciphertext: {error}") from None
            primes = self._context.primes_at(ciphertext.parms_id())
            if primes != plan.input_primes or tuple(ciphertext.parms_id()) != level:
                raise InvalidArgument(
                    field,
                    f"encrypted at a level with {primes} primes, plan expects {plan.input_primes}",
                )
            if ciphertext.size() != 2 or not ciphertext.is_ntt_form():
                raise InvalidArgument(
                    field, f"has {ciphertext.size()} polynomials (expected 2, in NTT form)"
                )
            if ciphertext.scale() != scale:
                raise InvalidArgument(
                    field,
                    f"scale {ciphertext.scale()!r}, the plan's is 2^{plan.input_scale_bits}",
                )
            if ciphertext.is_transparent():
                raise InvalidArgument(field, "is transparent (not encrypted)")
            loaded.append(ciphertext)
            payloads.append(frame.payload)
        return loaded, payloads

    # -- PER_TOKEN -----------------------------------------------------------------

    def _encode_per_token(
        self,
        plan: Plan,
        lora_as: Sequence[FloatArray],
        scaled_bs: Sequence[FloatArray],
        offsets: Sequence[int] | None,
    ) -> EncodedAdapter:
        """One layer (``offsets`` None) or several in their regions of one ciphertext;
        the overflow bounds and B's fixed-point scale cover the largest of them."""
        context = self._context
        top, middle = plan.input_primes, plan.input_primes - 1
        # x·A is encoded at the exact prime its rescale drops, so the scale returns to
        # 2^input_scale_bits with no drift. SERVER_BABY_STEPS does the same for u·B;
        # CLIENT_BABY_STEPS keeps u·B at the lowest level with B in fixed point.
        input_scale = context.rescale_prime(top)
        activation = plan.activation_bound * (math.sqrt(2.0) if plan.complex_packing else 1.0)
        inner_bound = activation * max(
            float(np.max(np.sum(np.abs(lora_a), axis=0))) for lora_a in lora_as
        )
        output_bound = max(
            _output_bound(activation, lora_a, scaled_b)
            for lora_a, scaled_b in zip(lora_as, scaled_bs, strict=True)
        )
        scaled_b = np.concatenate(scaled_bs, axis=1)
        scale = 2.0**plan.input_scale_bits
        self._require_fits(inner_bound * scale * input_scale, top, "x·A before its rescale")
        self._require_fits(inner_bound * scale, middle, "x·A")
        fixed_point_bits = math.inf
        if plan.variant is Variant.CLIENT_BABY_STEPS:
            b_scale_bits, fixed_point_bits = self._fixed_point_scale(
                plan, output_bound, scaled_b, plan.input_scale_bits
            )
            output_scale = 2.0**b_scale_bits
            self._require_fits(output_bound * scale * output_scale, middle, "the delta")
        else:
            output_scale = context.rescale_prime(middle)
            self._require_fits(
                output_bound * scale * output_scale, middle, "the delta before its rescale"
            )
            self._require_fits(output_bound * scale, middle - 1, "the delta")
        if offsets is None:
            inputs = packing.input_diagonals(plan, lora_as[0])
            outputs = packing.output_diagonals(plan, scaled_bs[0])
        else:
            sizes = [b.shape[1] for b in scaled_bs]
            inputs = packing.shared_input_diagonals(plan, lora_as, offsets, sizes)
            outputs = packing.shared_output_diagonals(plan, scaled_bs, offsets)
        return EncodedAdapter(
            encoding_key=plan.encoding_key(),
            input_diagonals=self._encode_vectors(inputs, input_scale, top),
            output_diagonals=self._encode_vectors(outputs, output_scale, middle),
            output_bound=output_bound,
            fixed_point_bits=fixed_point_bits,
        )

    def _fixed_point_scale(
        self, plan: Plan, output_bound: float, weights: FloatArray, scale_bits_before: float
    ) -> tuple[int, float]:
        """Choose the fixed-point scale of the last, unrescaled product's weights.

        The largest power of two for which 2^scale_bits_before * scale * |delta| still
        fits the last prime with headroom, capped so that the product's scale itself
        stays well inside the prime when the weights are (near) zero.

        Returns:
            (scale bits, fixed-point bits kept by the largest weight).

        Raises:
            FailedPrecondition: The weights would keep fewer than
                :data:`MIN_FIXED_POINT_BITS` bits.
        """
        budget_bits = self._context.params.data_prime_bits[0] - _HEADROOM_BITS
        cap_bits = math.floor(budget_bits - 2 - scale_bits_before)
        if output_bound > 0:
            scale_bits = min(
                cap_bits, math.floor(budget_bits - scale_bits_before - math.log2(output_bound))
            )
        else:
            scale_bits = cap_bits
        peak = float(np.max(np.abs(weights)))
        fixed_point_bits = scale_bits + math.log2(peak) if peak > 0 else math.inf
        if fixed_point_bits < MIN_FIXED_POINT_BITS:
            raise FailedPrecondition(
                f"with activation_bound {plan.activation_bound:g} the adapter's worst-case delta "
                f"({output_bound:.4g}) leaves its weights only {fixed_point_bits:.1f} bits of "
                f"fixed-point precision (< {MIN_FIXED_POINT_BITS}) in the {plan.variant.value} "
                f"variant; compile with a tighter activation bound or another variant",
                reason="ADAPTER_OUT_OF_RANGE",
            )
        return scale_bits, fixed_point_bits

    def _encode_vectors(
        self, vectors: list[list[FloatArray]], scale: float, primes: int
    ) -> tuple[tuple[Any, ...], ...]:
        encoder = self._context.encoder
        evaluator = seal.Evaluator(self._context.seal_context)
        level = list(self._context.parms_id_for_primes(primes))
        encoded: list[tuple[Any, ...]] = []
        for row in vectors:
            plains = []
            for vector in row:
                plain = encoder.encode(np.ascontiguousarray(vector), scale)
                if plain.is_zero():
                    # An all-zero diagonal: the smallest non-zero plaintext instead (see
                    # the module docstring, "Zero weights").
                    plain = encoder.encode(np.full(self._context.slot_count, 1.0 / scale), scale)
                evaluator.mod_switch_to_inplace(plain, level)
                plains.append(plain)
            encoded.append(tuple(plains))
        return tuple(encoded)

    def _per_token_unit(
        self,
        plan: Plan,
        adapter: EncodedAdapter,
        evaluator: CountingEvaluator,
        copies: Sequence[Any],
    ) -> Any:
        if plan.variant is Variant.CLIENT_BABY_STEPS:
            rotated = list(copies)  # the client sent the baby-step rotations
        else:
            rotated = _baby_steps(evaluator, copies[0], plan.baby_steps)
        inner = _giant_steps(evaluator, rotated, adapter.input_diagonals, plan.baby_steps)
        if plan.variant is Variant.CLIENT_BABY_STEPS:
            # Every rotation before the fixed-point product at two primes (a rotation at
            # one prime adds noise far above this plan's small activation scale; see
            # the compiler), then the baby copies are rescaled one by one.
            _fold(plan, evaluator, inner)
            partials = _baby_partials(
                evaluator, inner, adapter.output_diagonals, range(plan.output_baby_steps)
            )
            return _sum_giant_partials(evaluator, partials, plan.output_baby_steps)
        evaluator.rescale_inplace(inner)
        _fold(plan, evaluator, inner)
        result = _giant_steps(
            evaluator,
            _baby_steps(evaluator, inner, plan.output_baby_steps),
            adapter.output_diagonals,
            plan.output_baby_steps,
        )
        evaluator.rescale_inplace(result)
        return result

    # -- BATCH_FIRST ---------------------------------------------------------------

    def _encode_batch_first(
        self, plan: Plan, lora_a: FloatArray, scaled_b: FloatArray
    ) -> EncodedAdapter:
        if plan.variant is Variant.ONE_PRIME:
            return self._encode_one_prime(plan, lora_a, scaled_b)
        context = self._context
        activation = plan.activation_bound * (math.sqrt(2.0) if plan.complex_packing else 1.0)
        input_scale = 2.0**plan.input_scale_bits
        inner_bound = activation * float(np.max(np.sum(np.abs(lora_a), axis=0)))
        output_bound = _output_bound(activation, lora_a, scaled_b)
        a_scale = float(context.rescale_prime(plan.input_primes))
        self._require_fits(
            inner_bound * input_scale * a_scale, plan.input_primes, "x·A before its rescale"
        )
        self._require_fits(inner_bound * input_scale, plan.output_primes, "x·A")
        b_scale_bits, fixed_point_bits = self._fixed_point_scale(
            plan, output_bound, scaled_b, plan.input_scale_bits
        )
        return _batch_adapter(
            plan, lora_a, a_scale, scaled_b, 2.0**b_scale_bits, output_bound, fixed_point_bits
        )

    def _encode_one_prime(
        self, plan: Plan, lora_a: FloatArray, scaled_b: FloatArray
    ) -> EncodedAdapter:
        """A and B in fixed point at the one prime, with the plan's layout's bits.

        Each scale is the power of two that gives the largest entry 2^bits..2^(bits+1)
        units; the compiler's budget reserves the extra bit, so the delta fits the
        prime for every activation within the bound (checked again here with the
        adapter's own L1 norms).
        """
        layout = one_prime_layout(
            self._context.params,
            hidden_size=plan.hidden_size,
            rank=plan.rank,
            activation_bound=plan.activation_bound,
        )
        a_scale = _fixed_point_scale_for(lora_a, layout.a_bits)
        b_scale = _fixed_point_scale_for(scaled_b, layout.b_bits)
        activation = plan.activation_bound * math.sqrt(2.0)
        output_bound = _output_bound(activation, lora_a, scaled_b)
        self._require_fits(
            output_bound * 2.0**plan.input_scale_bits * a_scale * b_scale, 1, "x·A·B"
        )
        # Near-zero weights get large scales: the product's scale must fit too.
        self._require_fits(
            4.0 * 2.0**plan.input_scale_bits * a_scale * b_scale, 1, "the scale of x·A·B"
        )
        return _batch_adapter(
            plan, lora_a, a_scale, scaled_b, b_scale, output_bound, float(layout.b_bits)
        )

    def _batch_group(
        self,
        plan: Plan,
        adapter: EncodedAdapter,
        evaluator: CountingEvaluator,
        inputs: Sequence[Any],
    ) -> list[Any]:
        inner = self._batch_upper(plan, adapter, evaluator, inputs, range(plan.hidden_size))
        if plan.variant is Variant.TWO_PRIMES:
            for accumulator in inner:
                # One rescale per accumulated output, not per product.
                evaluator.rescale_inplace(accumulator)
        return self._batch_lower(plan, adapter, evaluator, inner, range(plan.output_size))

    def _batch_upper(
        self,
        plan: Plan,
        adapter: EncodedAdapter,
        evaluator: CountingEvaluator,
        inputs: Sequence[Any],
        features: range,
    ) -> list[Any]:
        """x·A over some input features: per column of A, sum_i A[i, j] * inputs[i]
        (not rescaled; ``inputs`` holds the ciphertexts of ``features`` in order)."""
        lora_a, _ = _batch_weights(adapter)
        upper = self._context.parms_id_for_primes(plan.input_primes)
        inner: list[Any] = []
        for column in range(lora_a.shape[1]):
            weights = (
                evaluator.encode_scalar(float(lora_a[feature, column]), adapter.lora_a_scale, upper)
                for feature in features
            )
            inner.append(_sum_of_products(evaluator, zip(inputs, weights, strict=True)))
        return inner

    def _batch_lower(
        self,
        plan: Plan,
        adapter: EncodedAdapter,
        evaluator: CountingEvaluator,
        inner: Sequence[Any],
        outputs: range,
    ) -> list[Any]:
        """u·B for some output features, from the r rescaled columns of x·A."""
        _, lora_b = _batch_weights(adapter)
        lower = self._context.parms_id_for_primes(plan.output_primes)
        results: list[Any] = []
        for feature in outputs:
            weights = (
                evaluator.encode_scalar(float(lora_b[column, feature]), adapter.lora_b_scale, lower)
                for column in range(len(inner))
            )
            results.append(_sum_of_products(evaluator, zip(inner, weights, strict=True)))
        return results

    def _split_group(
        self,
        plan: Plan,
        adapter: EncodedAdapter,
        evaluator: CountingEvaluator,
        inputs: list[Any],
        payloads: list[bytes],
        peer: PeerWorker,
    ) -> list[Any]:
        """One BATCH_FIRST token group on two cores (same operations as the serial one).

        x·A: the peer sums the second half of the input features for every column,
        this process the first half; the partial sums are added and rescaled here. u·B:
        the peer computes the second half of the output features.
        """
        features = range(plan.hidden_size)
        half = (len(features) + 1) // 2
        pending = peer.submit(
            self._task(plan, adapter, "batch_upper", (payloads[half:], features[half:]))
        )
        try:
            inner = self._batch_upper(plan, adapter, evaluator, inputs[:half], features[:half])
        finally:
            theirs = self._absorb(evaluator, pending.result())
        for accumulator, their in zip(inner, theirs, strict=True):
            evaluator.add_inplace(accumulator, their)
            if plan.variant is Variant.TWO_PRIMES:
                evaluator.rescale_inplace(accumulator)
        outputs = range(plan.output_size)
        half = (len(outputs) + 1) // 2
        blobs = [ciphertext.to_string() for ciphertext in inner]
        pending = peer.submit(self._task(plan, adapter, "batch_lower", (blobs, outputs[half:])))
        try:
            results = self._batch_lower(plan, adapter, evaluator, inner, outputs[:half])
        finally:
            theirs = self._absorb(evaluator, pending.result())
        return results + theirs

    def _require_fits(self, bound: float, primes: int, what: str) -> None:
        bits = sum(self._context.params.data_prime_bits[:primes]) - _HEADROOM_BITS
        if bound >= 2.0**bits:
            raise FailedPrecondition(
                f"with the plan's activation_bound, {what} can reach 2^{math.log2(bound):.1f} "
                f"in the modulus, over the 2^{bits} available at that level; compile with a "
                f"tighter activation bound or larger primes",
                reason="ADAPTER_OUT_OF_RANGE",
            )


def _fold(plan: Plan, evaluator: CountingEvaluator, inner: Any) -> None:
    """Fold the L / r partial sums; afterwards slot i holds u[i mod r] everywhere."""
    step = plan.padded_rank
    while step < plan.block_length:
        evaluator.add_inplace(inner, evaluator.rotate(inner, step))
        step *= 2


def _baby_steps(evaluator: CountingEvaluator, ciphertext: Any, baby: int) -> list[Any]:
    """The baby-step rotations rot(x, 0), ..., rot(x, n1 - 1)."""
    return [ciphertext] + [evaluator.rotate(ciphertext, step) for step in range(1, baby)]


def _giant_steps(
    evaluator: CountingEvaluator,
    rotated: Sequence[Any],
    diagonals: tuple[tuple[Any, ...], ...],
    baby: int,
    giants: Sequence[int] | None = None,
) -> Any:
    """Giant steps of the BSGS diagonal product: sum_g rot(sum_b D'_{g,b} * rotated[b], g*n1).

    ``giants`` restricts the sum to some giant steps (a peer sums the others).
    """
    total = None
    for giant in range(len(diagonals)) if giants is None else giants:
        partial = _sum_of_products(evaluator, zip(rotated[:baby], diagonals[giant], strict=True))
        if giant:
            partial = evaluator.rotate(partial, giant * baby)
        if total is None:
            total = partial
        else:
            evaluator.add_inplace(total, partial)
    return total


def _sum_of_products(evaluator: CountingEvaluator, pairs: Iterable[tuple[Any, Any]]) -> Any:
    """sum_k ciphertext_k * plaintext_k: n products and n - 1 additions, in order."""
    total = None
    for ciphertext, plaintext in pairs:
        product = evaluator.multiply_plain(ciphertext, plaintext)
        if total is None:
            total = product
        else:
            evaluator.add_inplace(total, product)
    return total


def _baby_partials(
    evaluator: CountingEvaluator,
    inner: Any,
    diagonals: tuple[tuple[Any, ...], ...],
    babies: Sequence[int],
) -> list[Any]:
    """CLIENT_BABY_STEPS u·B before its giant rotations, over some baby steps.

    Makes rot(u, b) for each b in ``babies`` (at two primes), rescales each copy, and
    returns per giant step g the sum over those b of E_{g,b} * rot(u, b). Rotations come
    before any rescale because the copies are rotated from ``inner`` itself, and the
    copy for b = 0 is ``inner`` rescaled in place.
    """
    copies = [inner if step == 0 else evaluator.rotate(inner, step) for step in babies]
    for copy in copies:
        evaluator.rescale_inplace(copy)
    return [
        _sum_of_products(evaluator, zip(copies, (row[step] for step in babies), strict=True))
        for row in diagonals
    ]


def _sum_giant_partials(evaluator: CountingEvaluator, partials: Sequence[Any], baby: int) -> Any:
    """sum_g rot(partials[g], g * n1): the giant-step rotations of u·B."""
    total = partials[0]
    for giant in range(1, len(partials)):
        evaluator.add_inplace(total, evaluator.rotate(partials[giant], giant * baby))
    return total


def _batch_weights(adapter: EncodedAdapter) -> tuple[FloatArray, FloatArray]:
    if adapter.lora_a_values is None or adapter.lora_b_values is None:
        raise FailedPrecondition(
            "the adapter was not encoded for a BATCH_FIRST plan", reason="PLAN_MISMATCH"
        )
    return adapter.lora_a_values, adapter.lora_b_values


def _checked_weights(plan: Plan, weights: LoraWeights) -> tuple[FloatArray, FloatArray]:
    lora_a = np.asarray(weights.lora_a, dtype=np.float64)
    lora_b = np.asarray(weights.lora_b, dtype=np.float64)
    if lora_a.shape != (plan.hidden_size, plan.rank):
        raise InvalidArgument(
            "lora_a", f"shape {lora_a.shape} != ({plan.hidden_size}, {plan.rank})"
        )
    if lora_b.shape != (plan.rank, plan.output_size):
        raise InvalidArgument(
            "lora_b", f"shape {lora_b.shape} != ({plan.rank}, {plan.output_size})"
        )
    for name, array in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not np.all(np.isfinite(array)):
            raise InvalidArgument(name, "contains NaN or infinity")
    return lora_a, lora_b * plan.lora_scaling


def _output_bound(activation: float, lora_a: FloatArray, scaled_b: FloatArray) -> float:
    """Worst case of max |(x·A)·B'| over |x| <= activation, via per-column L1 norms."""
    inner = activation * np.sum(np.abs(lora_a), axis=0)
    return float(np.max(inner @ np.abs(scaled_b)))


def _batch_adapter(
    plan: Plan,
    lora_a: FloatArray,
    a_scale: float,
    scaled_b: FloatArray,
    b_scale: float,
    output_bound: float,
    fixed_point_bits: float,
) -> EncodedAdapter:
    """A BATCH_FIRST adapter: its weights rounded to the plaintext grids of their scales."""
    return EncodedAdapter(
        encoding_key=plan.encoding_key(),
        lora_a_values=_quantize_nonzero(lora_a, a_scale),
        lora_a_scale=a_scale,
        lora_b_values=_quantize_nonzero(scaled_b, b_scale),
        lora_b_scale=b_scale,
        output_bound=output_bound,
        fixed_point_bits=fixed_point_bits,
    )


def _fixed_point_scale_for(values: FloatArray, bits: int) -> float:
    """The power of two giving max |values| between 2^bits and 2^(bits + 1) units."""
    peak = float(np.max(np.abs(values)))
    if peak == 0:
        return 2.0**bits
    return 2.0 ** (bits - math.floor(math.log2(peak)))


def _quantize_nonzero(values: FloatArray, scale: float) -> FloatArray:
    """Round to the plaintext grid, moving exact zeros to one unit (see "Zero weights")."""
    units = np.rint(values * scale)
    units[units == 0] = 1.0
    return np.asarray(units / scale, dtype=np.float64)
