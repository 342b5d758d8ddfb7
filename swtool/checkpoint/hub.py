"""Hugging Face model ids (`org/name[@revision]`) resolved through huggingface_hub's local cache.

Resolution is offline: `snapshot_download(local_files_only=True)` maps the id
and revision (branch, tag or commit; `main` by default) to the cached snapshot
directory, models--org--name/snapshots/<commit>/, whose files are symlinks into
blobs/. HF_HUB_CACHE / HF_HOME choose the cache, as for every huggingface_hub
client. Nothing is downloaded unless `download=True` (`--download`), and then
only what a pass needs: config, tokenizer files, the index, and the weight
shards the index names (or model.safetensors), never the other files of the
repository (consolidated.safetensors, *.bin, *.gguf ...). HF_HUB_OFFLINE=1 forbids it.
"""

import re
from pathlib import Path

from swtool.errors import SwtoolError
from swtool.jsonfile import read_json

# org/name, optionally @revision; the same characters huggingface_hub accepts in repo ids
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?$")

# the small files a pass or an audit may read, besides the weights
SMALL_FILES = ["config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "generation_config.json"]
SINGLE_WEIGHTS = "model.safetensors"
PLAIN_SHARD = re.compile(r"[A-Za-z0-9_.-]+\.safetensors")  # no glob characters, no directories


def parse_hub_id(spec):
    """(repo_id, revision or None) if `spec` is spelled like a Hub model id, else None."""
    match = HUB_ID.match(str(spec))
    if match is None or match["repo"].endswith((".", "-")):
        return None
    return match["repo"], match["revision"]


def cache_dir():
    """The hub cache huggingface_hub uses (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_cache_path(repo_id, cache=None):
    """Where the cache keeps a model repository: <cache>/models--org--name."""
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache or cache_dir()) / repo_folder_name(repo_id=repo_id, repo_type="model")


def resolve(spec, download=False, cache=None, missing_hint=None):
    """The local snapshot directory of Hub id `spec` (org/name[@revision]); downloads only with `download`.
    `missing_hint`: the advice of the error for an id not in the cache (default: pass --download)."""
    parsed = parse_hub_id(spec)
    if parsed is None:
        raise SwtoolError(f"{spec}: not a Hugging Face model id (org/name[@revision])")
    repo_id, revision = parsed
    cache = Path(cache or cache_dir())
    if download:
        return _download(spec, repo_id, revision, cache)
    return _cached(spec, repo_id, revision, cache, missing_hint or DOWNLOAD_HINT)


DOWNLOAD_HINT = "pass --download to fetch its config, tokenizer and weights"


def _cached(spec, repo_id, revision, cache, missing_hint=DOWNLOAD_HINT):
    """The cached snapshot, without any network access; a clear error naming the place searched."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    where = repo_cache_path(repo_id, cache)
    try:
        # config.json only: the cached tree listing may name files swtool never downloads
        snapshot = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True,
                                     allow_patterns=["config.json"])
    except LocalEntryNotFoundError:
        at = f" at revision {revision!r}" if revision else ""
        raise SwtoolError(f"{spec}: not a local path, and not in the Hugging Face cache{at} (searched {where}); "
                          f"{missing_hint}") from None
    except IncompleteSnapshotError:
        raise SwtoolError(f"{spec}: the cached snapshot in {where} lacks config.json; "
                          f"pass --download to complete it") from None
    return Path(snapshot)


def _download(spec, repo_id, revision, cache):
    """Fetch config, tokenizer and exactly the weight files the index names; returns the snapshot directory."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, \
        RepositoryNotFoundError, RevisionNotFoundError

    if constants.HF_HUB_OFFLINE:
        raise SwtoolError(f"{spec}: --download asked for, but HF_HUB_OFFLINE is set")
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=SMALL_FILES))
        weights = weight_files(snapshot)
        snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=weights)
    except RepositoryNotFoundError:
        raise SwtoolError(f"{spec}: no such model on the Hugging Face Hub (or it is private)") from None
    except RevisionNotFoundError:
        raise SwtoolError(f"{spec}: the Hub has no revision {revision!r} of {repo_id}") from None
    except GatedRepoError:
        raise SwtoolError(f"{spec}: gated on the Hub; accept its licence and log in (hf auth login)") from None
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:
        raise SwtoolError(f"{spec}: download failed ({str(e).splitlines()[0]})") from None
    except OSError as e:  # network down, disk full
        raise SwtoolError(f"{spec}: download failed ({e})") from None
    return snapshot


def weight_files(snapshot):
    """The safetensors files a checkpoint needs: the shards its index names, else model.safetensors."""
    index = Path(snapshot) / "model.safetensors.index.json"
    if not index.is_file():
        return [SINGLE_WEIGHTS]
    try:
        shards = sorted(set(read_json(index)["weight_map"].values()))
    except (SwtoolError, KeyError, TypeError, AttributeError):
        raise SwtoolError(f"{index}: not a valid safetensors index (no weight_map object)") from None
    for name in shards:  # they become download patterns: "*" or "../x" must not widen what is fetched
        if not isinstance(name, str) or not PLAIN_SHARD.fullmatch(name):
            raise SwtoolError(f"{index}: shard name {name!r} is not a plain .safetensors file name")
    return shards


def hub_id_of_path(path):
    """'org/name' if `path` lies in a hub cache snapshot (models--org--name/snapshots/<commit>/...), else None."""
    parts = Path(path).absolute().parts  # not resolve(): snapshot files are symlinks into blobs/
    for i, part in enumerate(parts[:-1]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            org_name = part[len("models--"):].split("--", 1)
            if len(org_name) == 2:
                return "/".join(org_name)
    return None
