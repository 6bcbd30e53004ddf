"""Training data: instruction examples on disk, joint batches in a fixed ratio, and cached vision features.

An example is `{id, images: [paths relative to its folder], instruction (with one <image> per image), response}` —
the format of `synthetic.jsonl` and `captions.jsonl` written by the synthesis stage.

What keeps the cost of a step proportional to the batch, not to the data set (the paper: 64k synthetic + 500k
caption examples, 24 + 64 per step; numbers in docs/scale.md):

- `ExampleFile` validates every record once, when training starts, and then keeps only numbers per example (the
  byte offset of its line, its images' keys, its held-out key): about 30 bytes each. DataLoader workers read back,
  tokenise and pad the examples of a step (`Collator`), and decode images when features are not cached.
- `JointSampler`: batches are a pure function of (seed, step). Each source is walked through one seeded permutation
  per epoch (computed once per epoch, not per sample), so a resumed run sees exactly the batches an uninterrupted
  run would, and N data-parallel ranks each take a fixed slice of the same global batch.
- `FeatureStore`: the frozen ViT's features of every image, computed once before the first step — in memory, or on
  disk as sharded `.npy` files that every rank and node shares (each rank computes a share of the shards) and that
  are read row by row through a memory map without staying resident; optionally in half precision.
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cheetah.errors import CheetahError
from cheetah.formats import instruction_problem, iter_jsonl_offsets, read_jsonl_at
from cheetah.formats import where as record_where
from cheetah.io import DataError, atomic_write_json, safe_join
from cheetah.model.prompts import PromptBuilder, PromptError

HELDOUT_SALT = "heldout"


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    images: tuple[Path, ...]
    instruction: str
    response: str
    source_id: str | None = None


def parse_example(rec: dict[str, Any], root: Path, where: str) -> Example:
    """One record as an Example; every problem names `where` (file:line and id) and the field."""
    problem = instruction_problem(rec)
    if problem:
        raise DataError(f"{where}: {problem}")
    images = tuple(safe_join(root, p, what=f"{where}: images") for p in rec["images"])
    return Example(rec["id"], images, rec["instruction"], rec["response"], rec.get("source_id"))


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def heldout_key(example: Example, salt: str = HELDOUT_SALT) -> int:
    """32-bit key of an example's source image; `key / 0xFFFFFFFF < fraction` holds it out (all examples of a
    source image go the same way, so no held-out source image is ever trained on)."""
    return int(hashlib.sha256(salt.encode() + (example.source_id or example.id).encode()).hexdigest()[:8], 16)


class ExampleFile:
    """A JSONL file of examples, validated once and then held as arrays, not Python objects.

    Per example: the byte offset of its record, its images' keys, and its held-out key (about 30 bytes). A record is
    read back from disk when a batch needs it (`example`), in whichever process builds the batch. An image's key
    is a 64-bit hash of its path (relative to the file's folder), size and modification time: the feature store
    looks features up by it, and a replaced image gets a new key.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.root = self.path.parent
        self._handle: tuple[int, Any] | None = None
        root = self.root.resolve()
        offsets, starts, keys, split, ids = array("q"), array("q", [0]), array("Q"), array("I"), array("Q")
        for lineno, offset, rec in iter_jsonl_offsets(self.path):
            where = record_where(self.path, lineno, rec)
            example = parse_example(rec, self.root, where)
            for image in example.images:
                try:
                    st = image.stat()
                except OSError:
                    raise DataError(f"{where}: images: {image} not found") from None
                keys.append(_hash64(f"{image.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}"))
            offsets.append(offset), starts.append(len(keys))
            split.append(heldout_key(example)), ids.append(_hash64(example.id))
        # (numpy views of the arrays: no copies)
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self.image_start = np.frombuffer(starts, dtype=np.int64)
        self.image_keys = np.frombuffer(keys, dtype=np.uint64)
        self.split_keys = np.frombuffer(split, dtype=np.uint32)
        self._check_unique_ids(np.frombuffer(ids, dtype=np.uint64))

    def _check_unique_ids(self, ids: np.ndarray) -> None:
        values, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            dup = int(values[counts > 1][0])
            for i in range(len(self)):
                rec = self._record(i)
                if _hash64(rec["id"]) == dup:
                    raise DataError(f"{self.path}: duplicate id {rec['id']!r}")

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict[str, Any]:  # an open file does not travel to another process
        return {**self.__dict__, "_handle": None}

    def _record(self, i: int) -> dict[str, Any]:
        if self._handle is None or self._handle[0] != os.getpid():  # one handle per process (DataLoader workers)
            self._handle = (os.getpid(), open(self.path, "rb"))  # noqa: SIM115 - kept open for the process
        return read_jsonl_at(self._handle[1], self.path, int(self.offsets[i]))

    def where(self, i: int) -> str:
        """`file:line` of example i (for messages: counts the lines before it)."""
        with open(self.path, "rb") as f:
            line = f.read(int(self.offsets[i])).count(b"\n") + 1
        return f"{self.path}:{line}"

    def example(self, i: int) -> Example:
        """Example `i`, read back from disk (validated when the file was indexed)."""
        rec = self._record(i)
        return Example(rec["id"], tuple(self.root / p for p in rec["images"]), rec["instruction"], rec["response"],
                       rec.get("source_id"))

    def keys_of(self, i: int) -> np.ndarray:
        return self.image_keys[self.image_start[i]:self.image_start[i + 1]]

    def split(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, held-out rows), in file order: held out by source image (see `heldout_key`)."""
        held = self.split_keys.astype(np.float64) / 0xFFFFFFFF < fraction
        return np.flatnonzero(~held), np.flatnonzero(held)


def load_pixels(path: Path, image_processor: Any) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None
    return image_processor(images=im, return_tensors="pt")["pixel_values"][0]


# ---------------------------------------------------------------------------------------------------------------
# Which examples form a step
# ---------------------------------------------------------------------------------------------------------------


class JointSampler:
    """Which examples form step `s`: `synthetic_batch` discriminative + `caption_batch` caption examples.

    Each source is walked through a fresh seeded permutation per epoch; the positions of step `s` are a pure
    function of (seed, s), so resuming at step `s` needs no sampler state. The permutation of an epoch is computed
    once and kept while the steps use it, so a step costs O(batch), not O(data set).
    """

    def __init__(self, n_synthetic: int, n_captions: int, synthetic_batch: int, caption_batch: int, seed: int):
        if synthetic_batch and n_synthetic == 0:
            raise DataError("synthetic_batch > 0 but there are no synthetic training examples")
        if caption_batch and n_captions == 0:
            raise DataError("caption_batch > 0 but there are no caption examples")
        self.sizes = (n_synthetic, n_captions)
        self.batches = (synthetic_batch, caption_batch)
        self.seed = seed
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            # Keep the two newest epochs per source: a step can straddle an epoch boundary.
            for old in [k for k in self._perms if k[0] == source and k[1] < epoch - 1]:
                del self._perms[old]
            self._perms[key] = np.random.default_rng([self.seed, source, epoch]).permutation(self.sizes[source])
        return self._perms[key]

    def _take(self, source: int, step: int) -> list[int]:
        n, b = self.sizes[source], self.batches[source]
        out: list[int] = []
        pos, end = step * b, (step + 1) * b
        while pos < end:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, end - pos)
            out.extend(self._permutation(source, epoch)[offset:offset + take].tolist())
            pos += take
        return out

    def step(self, step: int) -> tuple[list[int], list[int]]:
        return self._take(0, step), self._take(1, step) if self.batches[1] else []


# ---------------------------------------------------------------------------------------------------------------
# Vision features, computed once
# ---------------------------------------------------------------------------------------------------------------

FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# numpy has no bfloat16: its bits are stored as int16 and viewed back.
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


class FeatureStore:
    """The vision features of a fixed, sorted set of image keys: one tensor in memory, or `.npy` shards of
    `shard_size` rows in `directory` (row `r` is row `r % shard_size` of shard `r // shard_size`).

    On disk, rows are copied out of a memory map and the pages are then released (`madvise(DONTNEED)`), so reading
    a data set far larger than RAM keeps only the current batch resident; the page cache still serves re-reads.
    """

    def __init__(self, keys: np.ndarray, dtype: torch.dtype, *, tensor: torch.Tensor | None = None,
                 directory: Path | None = None, shard_size: int = 1024):
        self.keys = keys
        self.dtype = dtype
        self.tensor = tensor
        self.directory = directory
        self.shard_size = shard_size
        self._maps: dict[int, tuple[mmap.mmap, int, tuple[int, ...]]] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:  # memory maps do not travel to another process
        return {**self.__dict__, "_maps": {}}

    def rows(self, keys: np.ndarray) -> np.ndarray:
        rows = np.searchsorted(self.keys, keys)
        if len(rows) and (rows.max() >= len(self.keys) or (self.keys[rows] != keys).any()):
            raise DataError("an image of this batch has no cached features (was the data changed while training?)")
        return rows

    def _shard(self, s: int) -> tuple[mmap.mmap, int, tuple[int, ...]]:
        if self._pid != os.getpid():  # a forked DataLoader worker maps the files itself
            self._maps, self._pid = {}, os.getpid()
        if s not in self._maps:
            path = shard_path(self.directory, s)
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, _ = read_header(f)
                header = f.tell()
                self._maps[s] = (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), header, tuple(shape[1:]))
        return self._maps[s]

    def get(self, keys: np.ndarray) -> torch.Tensor:
        """(len(keys), P, D) features in the store's dtype."""
        rows = self.rows(np.asarray(keys, dtype=np.uint64))
        if self.tensor is not None:
            return self.tensor[torch.from_numpy(rows)]
        np_dtype = _NUMPY[self.dtype]
        itemsize = np.dtype(np_dtype).itemsize
        if not len(rows):
            return torch.empty(0, dtype=self.dtype)
        out: torch.Tensor | None = None
        touched = set()
        for i, r in enumerate(rows.tolist()):
            mm, header, shape = self._shard(r // self.shard_size)
            touched.add(mm)
            count = int(np.prod(shape))
            if out is None:
                out = torch.empty((len(rows), *shape), dtype=self.dtype)
                if torch.utils.data.get_worker_info() is not None:
                    out.share_memory_()  # in a DataLoader worker: sent to the training process without a copy
                view = _to_numpy(out)
            offset = header + (r % self.shard_size) * count * itemsize
            view[i] = np.frombuffer(mm, dtype=np_dtype, count=count, offset=offset).reshape(shape)
        for mm in touched:  # release the mapped pages (the kernel maps neighbours of every page read, too)
            mm.madvise(mmap.MADV_DONTNEED)
        return out


def shard_path(directory: Path, shard: int) -> Path:
    return directory / f"shard-{shard:06d}.npy"


def feature_key(vision: torch.nn.Module, image_processor: Any) -> str:
    """What cached vision features are a function of, besides the images: the vision encoder's weights as loaded
    (their content: another backbone of the same architecture, e.g. a `base` stage that reran, gives other
    features) and the image processor's settings (size, normalisation). 16 hex digits of a SHA-256."""
    import json

    h = hashlib.sha256()
    for name, tensor in sorted(vision.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}\0{t.dtype}\0{tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    settings = image_processor.to_dict() if hasattr(image_processor, "to_dict") else repr(image_processor)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def store_directory(setting: str | Path, weights_key: str, dtype: torch.dtype, keys: np.ndarray) -> Path:
    """`<setting>/<vision weights key>-<dtype>-<hash of the image keys>`: other weights (`feature_key`), precision or
    images never read stale features."""
    digest = hashlib.sha256(np.ascontiguousarray(keys).tobytes()).hexdigest()[:16]
    return Path(setting) / f"{weights_key}-{str(dtype).removeprefix('torch.')}-{digest}"


class _Images(torch.utils.data.Dataset):
    """Item u: the pixels of unique image u (its first occurrence in the example files), for the precompute pass."""

    def __init__(self, files: Sequence[ExampleFile], file_of: np.ndarray, example_of: np.ndarray,
                 slot_of: np.ndarray, image_processor: Any):
        self.files, self.file_of, self.example_of, self.slot_of = files, file_of, example_of, slot_of
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.file_of)

    def __getitem__(self, u: int) -> torch.Tensor:
        example = self.files[int(self.file_of[u])].example(int(self.example_of[u]))
        return load_pixels(example.images[int(self.slot_of[u])], self.image_processor)


def build_feature_store(setting: str | None, files: Sequence[ExampleFile], *,
                        encode: Callable[[torch.Tensor], torch.Tensor], image_processor: Any, weights_key: str,
                        dtype: torch.dtype, batch_size: int = 64, shard_size: int = 1024, workers: int = 0,
                        rank: int = 0, world: int = 1, local_rank: int = 0, local_world: int = 1,
                        barrier: Callable[[], None] = lambda: None,
                        log: Callable[[str], None] = print) -> FeatureStore | None:
    """The features of every image of `files`, computed once (`train.feature_cache`): None -> None (the ViT runs in
    every step); "memory" -> computed by this process; a directory -> shards shared by all ranks, in a folder named
    by `weights_key` (`feature_key` of the encoder: its weights' content, never only its architecture), the dtype
    and the images, so features of other weights or other images are never reused.

    On disk, rank r computes the missing shards s with s % world == r; then, should a node not see another node's
    shards (a node-local disk), its local ranks compute what is still missing there. A shard is written under a
    temporary name and renamed, so a killed run leaves only complete shards, which the next run reuses. Shards are
    encoded in fixed batches, so the features do not depend on the number of ranks. Collective: call on every rank.
    """
    if setting is None:
        return None
    all_keys = np.concatenate([f.image_keys for f in files]) if files else np.zeros(0, np.uint64)
    keys, first = np.unique(all_keys, return_index=True)
    bounds = np.cumsum([0, *(len(f.image_keys) for f in files)])
    file_of = np.searchsorted(bounds, first, side="right") - 1
    pos = first - bounds[file_of]
    example_of, slot_of = np.zeros(len(keys), np.int64), np.zeros(len(keys), np.int64)
    for f, file in enumerate(files):  # where each unique image first occurs: (file, example, slot)
        mine = file_of == f
        example_of[mine] = np.searchsorted(file.image_start, pos[mine], side="right") - 1
        slot_of[mine] = pos[mine] - file.image_start[example_of[mine]]
    images = _Images(files, file_of, example_of, slot_of, image_processor)
    n_shards = -(-len(keys) // shard_size)
    np_dtype = _NUMPY[dtype]

    def compute(shards: list[int], sink: Callable[[int, int, torch.Tensor], None]) -> None:
        # One DataLoader over the shards' images, batches never crossing a shard: workers decode, we encode.
        batches = [list(range(lo, min(lo + batch_size, hi)))
                   for s in shards for hi in [min((s + 1) * shard_size, len(keys))]
                   for lo in range(s * shard_size, hi, batch_size)]
        if not batches:
            return
        loader = torch.utils.data.DataLoader(_ErrorsAsItems(images), batch_sampler=batches, num_workers=workers,
                                             collate_fn=_stack_images)
        t0 = time.perf_counter()
        with torch.no_grad():
            for done, (batch, pixels) in enumerate(zip(batches, loader), start=1):
                pixels = _unwrap(pixels)
                sink(batch[0] // shard_size, batch[0] % shard_size, encode(pixels).to("cpu", dtype))
                if done % 50 == 0 or done == len(batches):
                    log(f"vision features: {done}/{len(batches)} batches of this rank "
                        f"({time.perf_counter() - t0:.0f} s)")

    if setting == "memory":
        holder: dict[str, torch.Tensor] = {}

        def into_tensor(shard: int, row: int, feats: torch.Tensor) -> None:
            if "t" not in holder:
                holder["t"] = torch.empty((len(keys), *feats.shape[1:]), dtype=dtype)
            start = shard * shard_size + row
            holder["t"][start:start + len(feats)] = feats

        compute(list(range(n_shards)), into_tensor)
        return FeatureStore(keys, dtype, tensor=holder.get("t", torch.empty(0, dtype=dtype)), shard_size=shard_size)

    directory = store_directory(setting, weights_key, dtype, keys)
    directory.mkdir(parents=True, exist_ok=True)
    open_shards: dict[int, tuple[np.ndarray, Path]] = {}

    def into_shard(shard: int, row: int, feats: torch.Tensor) -> None:
        if shard not in open_shards:
            rows = min((shard + 1) * shard_size, len(keys)) - shard * shard_size
            tmp = directory / f".{shard_path(directory, shard).name}.{os.uname().nodename}-{os.getpid()}.tmp"
            open_shards[shard] = (np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype,
                                                            shape=(rows, *feats.shape[1:])), tmp)
        array_, tmp = open_shards[shard]
        array_[row:row + len(feats)] = _to_numpy(feats)
        if row + len(feats) == len(array_):  # the shard is complete: publish it
            array_.flush()
            del open_shards[shard], array_
            os.replace(tmp, shard_path(directory, shard))

    def missing() -> list[int]:
        return [s for s in range(n_shards) if not shard_path(directory, s).exists()]

    compute([s for s in missing() if s % world == rank], into_shard)
    barrier()
    compute(missing()[local_rank::local_world], into_shard)  # shards another node wrote where this one cannot see
    barrier()
    if missing():
        raise DataError(f"{directory}: feature shards {missing()[:5]} are missing after every rank computed its share")
    if rank == 0:
        atomic_write_json(directory / "store.json", {"images": int(len(keys)), "shards": n_shards,
                                                     "shard_size": shard_size, "dtype": str(dtype),
                                                     "weights_key": weights_key})
    return FeatureStore(keys, dtype, directory=directory, shard_size=shard_size)


# ---------------------------------------------------------------------------------------------------------------
# Batches, built by DataLoader workers
# ---------------------------------------------------------------------------------------------------------------


class Collator:
    """Rows of an example file -> a right-padded training batch with its images' vision inputs: cached features
    (in order of appearance) or, without a feature store, decoded pixels. Token arrays are numpy (they travel from a
    worker by value, cheaper than a shared-memory segment each); `batches` turns them back into tensors."""

    def __init__(self, builder: PromptBuilder, store: FeatureStore | None, image_processor: Any):
        self.builder = builder
        self.store = store
        self.image_processor = image_processor

    def __call__(self, file: ExampleFile, rows: Sequence[int]) -> dict[str, Any]:
        encoded, examples = [], []
        for r in rows:
            example = file.example(int(r))
            try:
                encoded.append(self.builder.encode(example.instruction, len(example.images), example.response))
            except PromptError as e:
                raise DataError(f"{file.where(int(r))} (id={example.id!r}): {e}") from None
            examples.append(example)
        batch: dict[str, Any] = {k: v.numpy() for k, v in self.builder.collate(encoded, "right").items()}
        # Who is in the batch, to name them when their loss is not finite (the loop pops it before the forward).
        batch["example_ids"] = [f"{file.path.stem} {e.id}" for e in examples]
        if self.store is not None:
            keys = [file.keys_of(int(r)) for r in rows]
            batch["vision_features"] = self.store.get(np.concatenate(keys) if keys else np.zeros(0, np.uint64))
        else:
            batch["pixel_values"] = torch.stack([load_pixels(p, self.image_processor)
                                                 for e in examples for p in e.images])
        return batch


class StepBatches(torch.utils.data.Dataset):
    """Item `step`: this rank's share of optimiser step `step`, as `gradient_accumulation` micro-batches, each a list
    of one batch per source (synthetic, caption; sources differ in length, so padding them together would waste
    compute). Rank r takes every world-th example of the global batch, micro-batch m every accumulation-th of
    those: 1 and N processes see the same examples."""

    def __init__(self, sampler: JointSampler, sources: Sequence[tuple[ExampleFile, np.ndarray]], collate: Collator,
                 steps: int, rank: int = 0, world: int = 1, accumulation: int = 1):
        self.sampler, self.sources, self.collate = sampler, sources, collate
        self.steps, self.rank, self.world, self.accumulation = steps, rank, world, accumulation

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> list[list[dict[str, Any]]]:
        micro: list[list[dict[str, Any]]] = [[] for _ in range(self.accumulation)]
        for (file, rows), picks in zip(self.sources, self.sampler.step(step)):
            mine = rows[np.asarray(picks, dtype=np.int64)][self.rank::self.world]
            for m in range(self.accumulation):
                part = mine[m::self.accumulation]
                if len(part):
                    micro[m].append(self.collate(file, part))
        return micro


class ExampleBatches(torch.utils.data.Dataset):
    """Item i: the i-th batch of `batch_size` of the given rows (e.g. a rank's share of the held-out examples)."""

    def __init__(self, file: ExampleFile, rows: np.ndarray, collate: Collator, batch_size: int = 32):
        self.file, self.rows, self.collate, self.batch_size = file, rows, collate, batch_size

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.collate(self.file, self.rows[i * self.batch_size:(i + 1) * self.batch_size])


class _Raised:
    """A CheetahError raised in a DataLoader worker, sent back in place of the item it was building. PyTorch
    re-raises a worker's exception with the worker's traceback pasted into its message (17 lines where the CLI
    prints one); sent as a value, it reaches the training process as it was raised (`_unwrap`)."""

    def __init__(self, error: CheetahError):
        self.error = error


class _ErrorsAsItems(torch.utils.data.Dataset):
    """`dataset` whose items are a `_Raised` where building them raised a CheetahError (bad data, named by it)."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except CheetahError as e:
            return _Raised(e)


def _unwrap(item: Any) -> Any:
    if isinstance(item, _Raised):
        raise item.error
    return item


def _stack_images(items: list[Any]) -> Any:
    raised = [x for x in items if isinstance(x, _Raised)]
    return raised[0] if raised else torch.stack(items)


def _as_is(item: Any) -> Any:
    return item


def _tensors(item: Any) -> Any:
    if isinstance(item, np.ndarray):
        return torch.from_numpy(item)
    if isinstance(item, dict):
        return {k: _tensors(v) for k, v in item.items()}
    if isinstance(item, list):
        return [_tensors(v) for v in item]
    return item


def _die_with_parent(worker_id: int) -> None:
    """A DataLoader worker ends when the training process does, even by `kill -9`. (PyTorch's own check misses it
    when the worker is blocked on a full queue: orphaned workers then held ~0.5 GB each until the node rebooted.)"""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before the call: nobody would signal us
            os._exit(1)


def batches(dataset: torch.utils.data.Dataset, indices: Sequence[int], workers: int,
            pin_memory: bool = False) -> Iterator[Any]:
    """Items `indices` of `dataset`, in order, built `workers` processes ahead (0: in this process), numpy arrays
    turned into tensors."""
    loader = torch.utils.data.DataLoader(_ErrorsAsItems(dataset), batch_size=None, sampler=list(indices),
                                         num_workers=workers, collate_fn=_as_is, pin_memory=pin_memory,
                                         prefetch_factor=4 if workers else None,
                                         worker_init_fn=_die_with_parent if workers else None)
    return (_tensors(_unwrap(item)) for item in loader)
