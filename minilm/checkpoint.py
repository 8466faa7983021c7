"""Finding, reading and writing Hugging Face format checkpoints.

A checkpoint is a folder with `config.json`, `model.safetensors` (or a legacy `pytorch_model.bin`) and the tokenizer
files. It can be named three ways:
  * a local directory;
  * a name under the repository's `weights/` folder: `NAME` in weights/NAME, a Hub id in weights/ORG/NAME;
  * a Hugging Face Hub id (`cross-encoder/ms-marco-MiniLM-L6-v2`), fetched with huggingface_hub into its cache, so
    HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and revisions behave as users know them.
"""

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import socket
import tempfile
import threading
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import torch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
WEIGHTS_DIRS = (Path.cwd() / "weights", Path(__file__).resolve().parent.parent / "weights")
HUB_PROBE_SECONDS = 2.0  # a Hub that does not accept a connection in this time counts as unreachable: cache only


class CheckpointError(Exception):
    """A checkpoint that cannot be found or does not fit the model; the message says which file or tensor."""


def resolve(name_or_path: str, revision: str | None = None, **hub) -> Path:
    """The local folder holding checkpoint `name_or_path`, downloading it from the Hub when needed (`hub`: cache_dir,
    local_files_only and token, passed to huggingface_hub).

    An existing directory is used as it is. A name is looked for under weights/ exactly as written (`NAME` in
    weights/NAME, a Hub id `org/NAME` in weights/org/NAME) unless a revision is asked for, then on the Hub. A path
    that does not exist (`./x`, `/a/b`, `a/b/c`) is an error, never a fallback to something else."""
    if not str(name_or_path).strip():  # Path("") is the current folder
        raise CheckpointError(f"the model name is empty ({str(name_or_path)!r}): give a local folder, a name under "
                              "weights/ or a Hugging Face Hub id")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision is not None:  # a folder has no revisions: using it anyway would score with some other version
            raise CheckpointError(f"{name_or_path} is a local folder; a revision ({revision}) applies to Hub ids only")
        return _check_dir(path)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or (os.sep != "/" and os.sep in name_or_path)
    if path.exists():
        raise CheckpointError(f"{name_or_path} is a file; a model is a directory (config.json, model.safetensors, tokenizer)")
    if looks_like_path:
        raise CheckpointError(f"{name_or_path}: no such directory")
    if revision is None:
        for weights in WEIGHTS_DIRS:
            if (weights / name_or_path).is_dir():
                return _check_dir(weights / name_or_path)
    return _from_hub(name_or_path, revision, **hub)


def _check_dir(path: Path) -> Path:
    if not (path / "config.json").exists():
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json; found {found})")
    if not any((path / f).exists() for f in WEIGHT_FILES):
        index = next(iter(sorted(path.glob("*.index.json"))), None)
        if index is not None:
            raise CheckpointError(f"{path}: sharded weights ({index.name}) are not supported; save them as one "
                                  f"model.safetensors (save_pretrained(..., max_shard_size='1GB') in transformers)")
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin")
    return path


def _from_hub(repo_id: str, revision: str | None, cache_dir=None, local_files_only: bool = False, token=None) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    # huggingface_hub retries a host it cannot reach for ~25 s before using its cache or giving up; a quick probe
    # sends it straight to the cache instead
    unreachable = not offline and not local_files_only and not reachable(constants.ENDPOINT)
    cache_only = offline or local_files_only or unreachable

    def fetch(filename, revision=revision):
        """The file's path in the cache; None if the repo has no such file (or, from the cache alone, if the cache
        has none: there an absent file and one never downloaded look alike, as for transformers)."""
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, token=token,
                                        local_files_only=cache_only))
        except LocalEntryNotFoundError as e:
            if cache_only:
                return None
            # the Hub answered with an error, or not at all: skipping the file would load the model without it
            # (a tokenizer_config.json's max_length, a vocabulary) and score silently otherwise
            reason = str(e.__cause__ or e).splitlines()[0]
            raise CheckpointError(f"{repo_id}: {filename} could not be fetched from the Hub ({reason}); nothing was "
                                  "loaded: try again") from None
        except EntryNotFoundError:  # the Hub says this revision has no such file
            return None
        except (HFValidationError, RepositoryNotFoundError, RevisionNotFoundError):
            raise
        except Exception as e:  # the HTTP library's own errors (a read timeout, ...): one line, not a traceback
            raise CheckpointError(f"{repo_id}: fetching {filename} from the Hub failed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None

    how_to = (
        f"To use a local copy, pass its directory (--model /path/to/dir), or put it under weights/, e.g. "
        f"`hf download {repo_id} --local-dir weights/{repo_id}` on a machine with internet access."
    )
    try:
        config = fetch("config.json")
    except HFValidationError as e:
        raise CheckpointError(f"{repo_id!r} is neither a local directory nor a valid Hub id ({e})") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}: the Hugging Face Hub has no revision {revision!r} of it") from None
    except RepositoryNotFoundError as e:  # GatedRepoError too; the Hub answers 401 for a private repo without a token
        why = "is gated: accept its conditions on its Hub page, then" if isinstance(e, GatedRepoError) else \
            "was not found on the Hugging Face Hub; if it is private or gated,"
        raise CheckpointError(f"{repo_id} {why} log in (`hf auth login`) or set HF_TOKEN. {how_to}") from None
    if config is None:
        why = ("HF_HUB_OFFLINE is set" if offline else "local_files_only=True" if local_files_only else
               f"the Hugging Face Hub ({constants.ENDPOINT}) could not be reached")
        raise CheckpointError(
            f"model {repo_id!r} (revision {revision or 'main'}) is not a local directory, not under weights/, and not in "
            f"the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}); {why}. {how_to}"
        )
    # the rest from the commit config.json came from (its snapshot folder's name): a branch moved on by a push
    # meanwhile would put them in another snapshot, and the model would load from a folder holding only some of them
    commit = config.parent.name
    if fetch("model.safetensors", commit) is None and fetch("pytorch_model.bin", commit) is None:
        raise CheckpointError(f"{repo_id}: neither model.safetensors nor pytorch_model.bin could be fetched")
    for name in TOKENIZER_FILES:
        fetch(name, commit)
    return config.parent  # the snapshot folder: every file of one revision sits side by side


def reachable(url: str, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the host of `url` (or to the proxy the environment sets for it) opens within
    `timeout` seconds, name lookup included."""
    url = urlsplit(url)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    opened = []

    def connect():
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
            opened.append(True)
        except (OSError, ValueError):  # no such host, refused, timed out; a malformed port
            pass

    thread = threading.Thread(target=connect, daemon=True)  # the name lookup has no timeout of its own
    thread.start()
    thread.join(timeout)
    return bool(opened)


def read_json(path: Path) -> dict:
    """The JSON object in `path` (config.json, tokenizer_config.json); CheckpointError naming the file if it is not one."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # their messages say where, not which file
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object {{...}}, got {'an array' if isinstance(obj, list) else json.dumps(obj)[:40]}")
    return obj


def read_state_dict(folder: Path) -> dict:
    """The tensors of `model.safetensors` (else `pytorch_model.bin`); CheckpointError naming the file if it is empty,
    truncated or not such a file (the libraries' own errors do not say which file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    try:
        if path.exists():
            return load_file(path)
        path = folder / "pytorch_model.bin"
        # weights_only: a pickle from the internet must not be able to run code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a complete safetensors file ({e})") from None
    except (EOFError, RuntimeError, OSError) as e:  # empty, truncated, unreadable
        why = str(e).splitlines()[0] if str(e) else "the file ends too early"
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({why})") from None
    except pickle.UnpicklingError:  # its message suggests weights_only=False, which would run the file's code
        raise CheckpointError(f"{path}: not a PyTorch checkpoint of plain tensors") from None
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    return state


def load_weights(model: torch.nn.Module, state: dict, source) -> None:
    """Put `state` into `model`, asserting that every tensor has a place and every place a tensor of the right shape.

    The tensors become the parameters themselves (`assign=True`): a memory-mapped safetensors file is then read
    lazily and never copied (copy-on-write if trained), which keeps a cold start small. transformers also computes
    on memory-mapped weights, so CPU kernels see the same (unaligned) addresses as in the reference.

    Tolerated as transformers does: keys of a bare BertModel (no `bert.` prefix), TensorFlow-era `LayerNorm.gamma`
    and `LayerNorm.beta` names, the `embeddings.position_ids` and `embeddings.token_type_ids` buffers (constants, not
    weights), a pretraining head (`cls.*`: unused, with a warning), and a missing pooler or classifier (initialised as
    transformers would, with a warning: that head is untrained)."""
    bare = not any(k.startswith("bert.") for k in state)
    unused = [k for k in state if k.startswith("cls.")]
    names = {}  # our name -> the checkpoint's, for errors
    for key in state:
        if key in unused or key.endswith(("embeddings.position_ids", "embeddings.token_type_ids")):
            continue
        ours = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
        ours = ours if ours.startswith("classifier.") or not bare else f"bert.{ours}"
        if ours in names:  # LayerNorm.gamma beside LayerNorm.weight: which one is meant?
            raise CheckpointError(f"{source}: tensors {names[ours]} and {key} are both {ours}")
        names[ours] = key
    state = {ours: state[key] for ours, key in names.items()}
    expected = model.state_dict()
    unexpected = sorted(names[k] for k in set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s), which a BERT cross-encoder does not have: {listed(unexpected)}")
    initialised = [k for k in missing if k.startswith(("classifier.", "bert.pooler."))]
    if len(initialised) != len(missing):
        raise CheckpointError(f"{source}: missing tensor(s) {listed([k for k in missing if k not in initialised])}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{source}: tensor {names[key]} has shape {list(tensor.shape)}, the config expects {list(expected[key].shape)}")
    state = {k: v if v.dtype == torch.float32 else v.float() for k, v in state.items()}  # fp16/bf16 checkpoints
    broken = [names[k] for k, v in state.items() if v.device.type != "meta" and not bool(torch.isfinite(v).all())]
    if broken:  # every score would be NaN: a diverged run's or a damaged file's weights
        raise CheckpointError(f"{source}: tensor(s) {listed(broken)} hold NaN or infinite values")
    if unused:
        warnings.warn(f"{source}: the pretraining head ({len(unused)} cls.* tensors) is not used by a cross-encoder")
    if initialised:
        warnings.warn(f"{source}: {', '.join(initialised)} not in the checkpoint, initialised randomly; fine-tune before use")
        std = model.config.initializer_range
        for key in initialised:  # in this order, from torch's generator: a seeded run draws the same head
            shape = expected[key].shape
            state[key] = torch.empty(shape).normal_(0.0, std) if key.endswith("weight") else torch.zeros(shape)
    model.load_state_dict(state, assign=True)


def listed(names: list, most: int = 5) -> str:
    return ", ".join(names[:most]) + (f", and {len(names) - most} more" if len(names) > most else "")


@contextmanager
def atomic_path(path):
    """Yield a temporary file name beside `path`; when the block completes, the file is flushed to disk and renamed
    onto `path` (readers see the old file or the whole new one, also after a power cut); otherwise it is deleted."""
    path = Path(path)
    tmp = new_temporary(path)
    try:
        yield tmp
        finish_temporary(tmp, path)
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def new_temporary(path: Path) -> str:
    """An empty file beside `path`, to be written and renamed onto it. Its name says which machine and process write
    it, so that the next write of `path` can remove what a killed run left (remove_stale_temporaries)."""
    prefix = temporary_prefix(path)
    remove_stale_temporaries(path.parent, prefix)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{prefix}{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    return tmp


def finish_temporary(tmp: str, path: Path) -> None:
    """Give the written file `tmp` the old `path`'s permissions, or those of any new file (mkstemp's are owner-only),
    set after writing in case a writer replaced the file it was given; then flush it to disk."""
    if path.exists():
        shutil.copymode(path, tmp)
    else:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    fsync(tmp)


def temporary_prefix(path: Path) -> str:
    """How the names of atomic_path's temporary files for `path` begin; the writer's process id comes next. The name
    is cut to 120 bytes of UTF-8, so that the whole name stays within the usual limit of 255 bytes."""
    return f".{path.name.encode('utf-8', 'surrogateescape')[:120].decode('utf-8', 'ignore')}.{process_space()}-"


def process_space() -> str:
    """12 hex digits naming the processes whose ids this one can test: this boot of this machine's kernel, and this
    process id namespace (a container's own; containers may share a host name, not a namespace)."""
    try:
        key = f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc (macOS, BSD): no process id namespaces either
        key = socket.gethostname()
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def remove_stale_temporaries(folder: Path, prefix: str) -> None:
    """Delete the temporary files in `folder` that atomic_path named with `prefix` (this file, this process space)
    and the id of a process that no longer runs: left by a run that was killed outright (SIGKILL, out of memory, a
    power cut). Files of other machines or containers, of a process still running, or of any other shape stay (a
    process id taken up since by another program keeps its file: the safe side)."""
    if os.name != "posix":  # os.kill(pid, 0) tests for a process only on POSIX
        return
    ours = re.compile(re.escape(prefix) + r"(\d+)\.[a-z0-9_]{8}\.tmp")  # mkstemp's 8 random characters
    try:
        names = os.listdir(folder)
    except OSError:
        return  # creating the new temporary file reports the problem
    for name in names:
        match = ours.fullmatch(name)
        if match and not process_running(int(match[1])):
            try:
                os.unlink(folder / name)
            except OSError:
                pass  # gone already, or not ours to remove


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only whether it could be sent
    except (ProcessLookupError, OverflowError):  # no such process; a number beyond any process id
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fsync(path) -> None:
    """Flush a file's or a folder's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """`write(tmp_path)`, then an atomic rename onto `path` (see atomic_path)."""
    with atomic_path(path) as tmp:
        write(tmp)


def torch_save(path: Path, obj) -> None:
    """torch.save, atomically (see atomic_path). Serialized in memory, then written: a full disk is then an OSError
    that says so (torch's zip writer, given a file, replaces it with a RuntimeError, "unexpected pos 24640 vs 24532")."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())


def write_bytes(path: Path, data) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


@contextmanager
def atomic_open(path: Path):
    """A UTF-8 text file whose content replaces `path` atomically when the block completes (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        yield f


def write_text(path: Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: Path, obj) -> None:
    write_text(path, json_text(obj))


def json_text(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def safetensors_bytes(model: torch.nn.Module) -> bytes:
    """model.safetensors's content, in fp32. Serialized in memory and written by the caller: safetensors' save_file
    writes a temporary file of its own (left behind by kill -9) and reports a full disk as a SafetensorError, not an
    OSError."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    return save(state, metadata={"format": "pt"})


def replace_files_together(folder: Path, writes: dict) -> None:
    """Write every file of `writes` ({name: write(tmp_path)}) under a temporary name in `folder` and flush it to disk;
    only then rename them into place, in the dict's order. The last name is the file that makes the folder loadable
    (config.json): it is removed before the first rename, so that a run killed amid the renames leaves a folder that
    does not load, never one that loads an old and a new model mixed. A failure while writing (a full disk) leaves
    `folder` as it was."""
    folder = Path(folder)
    written = {}
    try:
        for name, write in writes.items():
            written[name] = new_temporary(folder / name)
            write(written[name])
            finish_temporary(written[name], folder / name)
        (folder / list(writes)[-1]).unlink(missing_ok=True)
        for name, tmp in written.items():
            os.replace(tmp, folder / name)
        fsync(folder)
    except BaseException:
        for tmp in written.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
