"""Models by name, found among what is already on this machine (nothing is downloaded).

A MODEL argument (every verb, and :func:`ember.load`) is, in this order:

1. an existing file or folder: used as it is;
2. ``ollama:NAME[:TAG]``: the GGUF blob of a model pulled with Ollama (``$OLLAMA_MODELS``, else
   ``~/.ollama/models``, else the Linux service's ``/usr/share/ollama/.ollama/models``). The manifest
   ``manifests/registry.ollama.ai/library/NAME/TAG`` (TAG defaults to ``latest``; ``ns/NAME`` and
   ``host/ns/NAME`` name other namespaces and registries) lists layers; the one with media type
   ``application/vnd.ollama.image.model`` is the GGUF file ``blobs/sha256-<hex>``;
3. ``org/name[@revision]``: a snapshot in the Hugging Face hub cache (``$HF_HUB_CACHE``, else
   ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), laid out as huggingface_hub writes it:
   ``models--org--name/refs/<revision>`` holds a commit hash and ``snapshots/<hash>/`` the files
   (symlinks into ``blobs/``). The revision is a branch or tag in ``refs/`` (default ``main``) or a
   commit hash (or a prefix of at least 7 characters);
4. ``name``: ``<models>/name`` or ``<models>/name.gguf`` in Ember's own model folder (``$EMBER_MODELS``,
   else ``~/.ember/models``), then a Hub repo without an organisation (``models--name``).

A name that matches none of these raises :class:`~ember.errors.ModelNotFoundError` listing the
closest local names. A path-like argument that does not exist (``./x``, ``/x/y``, ``a/b/c``) is
returned unchanged so that the loader reports it by path. This module reads directories and small
JSON files only; what a model *is* (config, parameters) is left to the loaders.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ember.errors import ModelNotFoundError

OLLAMA_PREFIX = "ollama:"
OLLAMA_REGISTRY = "registry.ollama.ai"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_SERVICE_STORE = Path("/usr/share/ollama/.ollama/models")  # where Ollama's Linux installer keeps models

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HF_ID = re.compile(rf"^({_PART})/({_PART})(?:@([A-Za-z0-9._/-]+))?$")  # org/name[@revision]
_PLAIN = re.compile(rf"^{_PART}$")
_HEX = re.compile(r"^[0-9a-f]{7,64}$")


@dataclass(frozen=True)
class LocalModel:
    """One model found on this machine."""

    name: str        # what to type: "org/name", "org/name@v2", "ollama:llama3.2:1b", "my-model"
    path: Path       # a folder (config.json + weights) or a GGUF file
    source: str      # "hf" (Hugging Face cache), "ollama" or "ember" (Ember's model folder)

    def size_bytes(self) -> int:
        """Bytes on disk, each file counted once (a Hub snapshot's symlinks are followed to their blobs)."""
        return _disk_bytes(self.path)


# ------------------------------------------------------------------------------------------- stores
def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def ollama_models_dir() -> Path:
    """Ollama's model store: ``$OLLAMA_MODELS``, else ``~/.ollama/models`` (or the Linux service's store)."""
    env = os.environ.get("OLLAMA_MODELS")
    if env:
        return Path(env).expanduser()
    home = Path("~/.ollama/models").expanduser()
    return OLLAMA_SERVICE_STORE if not home.is_dir() and OLLAMA_SERVICE_STORE.is_dir() else home


def ember_models_dir() -> Path:
    """Ember's own model folder: ``$EMBER_MODELS``, else ``~/.ember/models``."""
    return Path(os.environ.get("EMBER_MODELS") or "~/.ember/models").expanduser()


def stores() -> dict[str, Path]:
    """Where names are looked up, by source."""
    return {"hf": hf_cache_dir(), "ollama": ollama_models_dir(), "ember": ember_models_dir()}


# ------------------------------------------------------------------------------------------- resolve
def resolve(spec: str | os.PathLike) -> Path:
    """The file or folder MODEL ``spec`` names (see the module docstring for the forms, in order).

    Raises:
        ModelNotFoundError: a name that is not on this machine; the message lists close matches.
    """
    s = os.fspath(spec)
    p = Path(s).expanduser()
    if p.exists() or s.lower().endswith((".gguf", ".json")):
        return p  # a file the loader reads (or reports missing, by its path)
    if s.startswith(OLLAMA_PREFIX):
        return _ollama(s[len(OLLAMA_PREFIX):], s)
    m = _HF_ID.match(s)
    if m:
        return _hf(f"{m[1]}/{m[2]}", m[3], s)
    if _PLAIN.match(s):
        for cand in (ember_models_dir() / s, ember_models_dir() / f"{s}.gguf"):
            if cand.exists():
                return cand
        if (hf_cache_dir() / _hf_folder(s)).is_dir():
            return _hf(s, None, s)
        raise _not_found(s, f"{s!r} is not a file or folder here, nor a model in {ember_models_dir()}, the Hugging "
                            f"Face cache or the Ollama store")
    return p


def _not_found(spec: str, what: str) -> ModelNotFoundError:
    names = [m.name for m in list_models()]
    close = _close_matches(spec, names)
    hint = f"; close matches: {', '.join(close)}" if close else ("; `ember list` shows the models on this machine"
                                                                 if names else "; no local models found")
    return ModelNotFoundError(what + hint)


def _close_matches(spec: str, names: list[str], n: int = 5) -> list[str]:
    """Names like ``spec``, case-insensitively, whole or by their last part (``org/NAME``, ``ollama:NAME:tag``)."""
    def keys(name: str) -> set[str]:
        full = name.lower().removeprefix(OLLAMA_PREFIX).split("@")[0]
        last = full.rsplit("/", 1)[-1]
        return {full, last, last.split(":")[0]}

    index: dict[str, list[str]] = {}
    for name in names:
        for k in keys(name):
            index.setdefault(k, []).append(name)
    out: list[str] = []
    for k in sorted(keys(spec), key=len, reverse=True):
        for hit in difflib.get_close_matches(k, list(index), n=n, cutoff=0.6):
            out.extend(x for x in index[hit] if x not in out)
    return out[:n]


# ------------------------------------------------------------------------------------------- Hugging Face
def _hf_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def _hf(repo_id: str, revision: str | None, spec: str) -> Path:
    cache = hf_cache_dir()
    repo = cache / _hf_folder(repo_id)
    if not repo.is_dir():
        # the hub keeps the id's case; accept another case when only one cached repo matches
        folded = [d for d in _dirs(cache) if d.name.lower() == repo.name.lower()]
        if len(folded) != 1:
            raise _not_found(spec, f"{repo_id!r} is not in the Hugging Face cache ({cache}); nothing is downloaded: "
                                   f"fetch it first (e.g. `hf download {repo_id}`) or give a folder")
        repo = folded[0]
    snaps = repo / "snapshots"
    rev = revision or "main"
    if any(part in ("", ".", "..") for part in rev.split("/")):
        raise ModelNotFoundError(f"{spec}: {rev!r} is not a revision (a branch, tag or commit hash)")
    ref = repo / "refs" / rev
    if ref.is_file():
        snap = snaps / ref.read_text().strip()
    elif (snaps / rev).is_dir():
        snap = snaps / rev
    else:
        hits = [d for d in _dirs(snaps) if _HEX.match(rev) and d.name.startswith(rev)]
        if revision is None and not hits:
            hits = _dirs(snaps) if len(_dirs(snaps)) == 1 else []  # no refs/main: the only snapshot there is
        if len(hits) != 1:
            refs = sorted(str(r.relative_to(repo / "refs")) for r in (repo / "refs").rglob("*") if r.is_file()) \
                if (repo / "refs").is_dir() else []
            have = ", ".join(refs + [d.name[:12] for d in _dirs(snaps)]) or "none"
            raise ModelNotFoundError(f"{spec}: revision {rev!r} is not in the Hugging Face cache ({repo}); "
                                     f"cached revisions: {have}")
        snap = hits[0]
    if not snap.is_dir():
        raise ModelNotFoundError(f"{spec}: {ref} names snapshot {snap.name} but {snap} is missing; fetch it again")
    return _snapshot_model(snap, spec)


def _snapshot_model(snap: Path, spec: str) -> Path:
    """The folder, or the one GGUF file of a GGUF-only repo."""
    if (snap / "config.json").exists():
        return snap
    ggufs = sorted(p for p in snap.rglob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise ModelNotFoundError(f"{spec}: the snapshot holds {len(ggufs)} GGUF files "
                                 f"({', '.join(p.name for p in ggufs[:6])}); give one by its path, e.g. {ggufs[0]}")
    return snap  # no config.json: the loader names what is missing


def _hf_models(cache: Path) -> Iterator[LocalModel]:
    for repo in _dirs(cache):
        if not repo.name.startswith("models--"):
            continue
        repo_id = repo.name.removeprefix("models--").replace("--", "/")
        refs_dir = repo / "refs"
        refs = sorted(r for r in refs_dir.rglob("*") if r.is_file()) if refs_dir.is_dir() else []
        seen: set[str] = set()
        for r in sorted(refs, key=lambda r: r.name != "main"):  # main first: its snapshot is listed by the bare id
            commit = r.read_text().strip()
            rev = str(r.relative_to(refs_dir))
            if commit in seen:
                continue
            seen.add(commit)
            yield from _snapshot_entries(repo / "snapshots" / commit, repo_id if rev == "main" else f"{repo_id}@{rev}")
        for snap in _dirs(repo / "snapshots"):
            if snap.name not in seen:  # a snapshot no ref points at: by its commit
                yield from _snapshot_entries(snap, f"{repo_id}@{snap.name[:12]}")


def _snapshot_entries(snap: Path, name: str) -> Iterator[LocalModel]:
    if not snap.is_dir():
        return
    if (snap / "config.json").exists() and any(snap.glob("*.safetensors")):
        yield LocalModel(name, snap, "hf")
        return
    ggufs = sorted(p for p in snap.rglob("*.gguf") if p.is_file())
    for g in ggufs:
        yield LocalModel(name if len(ggufs) == 1 else str(g), g, "hf")


# ------------------------------------------------------------------------------------------- Ollama
def _ollama_manifest_path(store: Path, ref: str) -> Path:
    """``manifests/<host>/<namespace>/<name>/<tag>`` for ``NAME[:TAG]``, ``ns/NAME[:TAG]``, ``host/ns/NAME[:TAG]``."""
    name, tag = ref, "latest"
    head, sep, tail = ref.rpartition(":")
    if sep and "/" not in tail:
        name, tag = head, tail
    parts = name.split("/")
    if len(parts) == 1:
        parts = [OLLAMA_REGISTRY, "library", parts[0]]
    elif len(parts) == 2:
        parts = [OLLAMA_REGISTRY, *parts]
    return store.joinpath("manifests", *parts, tag)


def _ollama(ref: str, spec: str) -> Path:
    store = ollama_models_dir()
    if not ref or any(p in ("", ".", "..") for p in ref.replace(":", "/").split("/")):
        raise ModelNotFoundError(f"{spec!r}: give an Ollama model as ollama:NAME or ollama:NAME:TAG")
    manifest = _ollama_manifest_path(store, ref)
    if not manifest.is_file():
        raise _not_found(spec, f"{spec!r} is not in the Ollama store ({store}); nothing is downloaded: "
                               f"`ollama pull {ref}` first")
    return _ollama_blob(manifest, store, spec)


def _ollama_blob(manifest: Path, store: Path, spec: str) -> Path:
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers") or []
    except (OSError, ValueError, AttributeError) as e:
        raise ModelNotFoundError(f"{manifest}: not a readable Ollama manifest ({e})") from None
    digests = [ly.get("digest", "") for ly in layers
               if isinstance(ly, dict) and ly.get("mediaType") == OLLAMA_MODEL_LAYER]
    if not digests:
        raise ModelNotFoundError(f"{manifest}: no layer of type {OLLAMA_MODEL_LAYER} (the model's GGUF file)")
    blob = store / "blobs" / digests[0].replace(":", "-", 1)
    if not blob.is_file():
        raise ModelNotFoundError(f"{spec}: the manifest {manifest} names {blob.name}, which is missing from "
                                 f"{store / 'blobs'}; pull the model again")
    return blob


def _ollama_models(store: Path) -> Iterator[LocalModel]:
    root = store / "manifests"
    for host in _dirs(root):
        for ns in _dirs(host):
            for model in _dirs(ns):
                for tag in sorted(p for p in model.iterdir() if p.is_file()):
                    if host.name == OLLAMA_REGISTRY:
                        ref = model.name if ns.name == "library" else f"{ns.name}/{model.name}"
                    else:
                        ref = f"{host.name}/{ns.name}/{model.name}"
                    name = f"{OLLAMA_PREFIX}{ref}:{tag.name}"
                    try:
                        yield LocalModel(name, _ollama_blob(tag, store, name), "ollama")
                    except ModelNotFoundError:
                        continue  # a manifest without its blob (interrupted pull): not a usable model


# ------------------------------------------------------------------------------------------- Ember's folder
def _ember_models(root: Path) -> Iterator[LocalModel]:
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if p.is_dir() and (p / "config.json").is_file():
            yield LocalModel(p.name, p, "ember")
        elif p.is_file() and p.suffix.lower() == ".gguf":
            yield LocalModel(p.stem, p, "ember")


# ------------------------------------------------------------------------------------------- listing
def list_models() -> list[LocalModel]:
    """Every model in Ember's folder, the Hugging Face cache and the Ollama store, in that order."""
    return [*_ember_models(ember_models_dir()), *_hf_models(hf_cache_dir()), *_ollama_models(ollama_models_dir())]


def _dirs(p: Path) -> list[Path]:
    try:
        return sorted(d for d in p.iterdir() if d.is_dir())
    except OSError:
        return []


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                st = os.stat(os.path.join(dirpath, f))  # follows a snapshot's symlink to its blob
            except OSError:
                continue  # a dangling link (blob removed): takes no space
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total
