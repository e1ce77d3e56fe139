"""Models by Hub tag, the llama.cpp / Ollama convention: ``user/repo-GGUF:Q4_K_M`` names the file of that quant
in a repository of GGUF files (``llama-server -hf user/repo:Q4_K_M``, ``ollama run hf.co/user/repo:Q4_K_M``).

The tag is matched, case-insensitively, against the quant each file name ends with (``SmolLM2-1.7B-Instruct-
Q4_K_M.gguf``, ``model.q4_k_m.gguf``, ``Q4_K_M/model-Q4_K_M-00001-of-00002.gguf``); multimodal projectors
(``mmproj-*``) are not models. Only that file is downloaded, with huggingface_hub's progress bar, into the Hugging
Face cache; offline (``HF_HUB_OFFLINE`` or no network) the cache is enough. A tag that matches nothing is answered
with the quants there are.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .loader import ModelNotFoundError, _offline, _root_cause, _unreachable

# A quant as file names spell it: Q4_K_M, Q8_0, IQ4_XS, TQ1_0, F16, BF16, MXFP4, unsloth's UD-Q4_K_XL...
_QUANT = re.compile(r"(?i)(?:^|[-._])((?:ud-)?(?:i?q\d(?:_[a-z0-9]+)*|tq\d_\d|bf16|fp?16|fp?32|mxfp4))$")
_SPLIT = re.compile(r"(?i)-(\d{5})-of-(\d{5})$")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def split_tag(model_id: str) -> Optional[tuple[str, str]]:
    """``(repo, tag)`` when ``model_id`` is ``user/repo:TAG`` (a colon is never part of a Hub repo id), else None.

    Example:
        >>> split_tag("bartowski/SmolLM2-1.7B-Instruct-GGUF:Q4_K_M")
        ('bartowski/SmolLM2-1.7B-Instruct-GGUF', 'Q4_K_M')
        >>> split_tag("HuggingFaceTB/SmolLM2-135M-Instruct") is None
        True
    """
    repo, sep, tag = model_id.rpartition(":")
    if not sep or not tag or not _REPO_ID.match(repo):
        return None
    return repo, tag


def quant_of(path: str) -> Optional[str]:
    """The quant a GGUF file of a repository holds, from its name (or its folder's), upper-cased; None for a file
    that is not a model (a multimodal projector) or names none.

    Example:
        >>> quant_of("SmolLM2-1.7B-Instruct-Q4_K_M.gguf"), quant_of("Q8_0/model-Q8_0-00001-of-00002.gguf")
        ('Q4_K_M', 'Q8_0')
        >>> quant_of("mmproj-model-f16.gguf") is None
        True
    """
    parts = path.split("/")
    if not parts[-1].lower().endswith(".gguf") or parts[-1].lower().startswith("mmproj"):
        return None
    stem = _SPLIT.sub("", parts[-1][:-len(".gguf")])
    for name in (stem, *reversed(parts[:-1])):
        match = _QUANT.search(name)
        if match:
            return match.group(1).upper()
    return None


def pick_files(files: list[str], tag: str) -> list[str]:
    """The files of ``tag`` among a repository's ``files``: one, or the parts of a split file in order; empty when
    none matches.

    Example:
        >>> pick_files(["a-Q4_K_M.gguf", "a-Q8_0.gguf", "README.md"], "q4_k_m")
        ['a-Q4_K_M.gguf']
    """
    matching = sorted(f for f in files if (quant_of(f) or "").lower() == tag.lower())
    singles = [f for f in matching if not _SPLIT.search(f[:-len(".gguf")])]
    return singles[:1] if singles else matching


def available_quants(files: list[str]) -> list[str]:
    """The quants a repository's files hold, in name order.

    Example:
        >>> available_quants(["x-Q8_0.gguf", "x-Q4_K_M-00002-of-00002.gguf", "x-Q4_K_M-00001-of-00002.gguf"])
        ['Q4_K_M', 'Q8_0']
    """
    return sorted({q for q in map(quant_of, files) if q})


def download_tagged(repo: str, tag: str, revision: Optional[str], token: Optional[str]) -> Path:
    """The local path of ``repo``'s GGUF file for ``tag``, downloaded (that file only, with progress) unless the
    Hugging Face cache has it. Raises :class:`~tgi_nb.models.loader.ModelNotFoundError` naming the quants there are
    when the tag matches none, or when the file is split in parts (not joined here) or cannot be had."""
    model_id = f"{repo}:{tag}"
    files, where = _repo_files(model_id, repo, revision, token)
    if files is None:
        raise ModelNotFoundError(model_id, f"Model {model_id!r}: {where}, and the Hugging Face cache holds no GGUF "
                                           f"file of {repo!r}. Download it where the Hub is reachable.")
    chosen = pick_files(files, tag)
    if not chosen:
        quants = available_quants(files)
        there = f"its quants {where}: {', '.join(quants)}" if quants else f"it has no GGUF files {where}"
        raise ModelNotFoundError(model_id, f"Model {model_id!r}: no GGUF file of {repo!r} is tagged {tag!r}; "
                                           f"{there}. Name one as {repo}:<quant>.")
    if len(chosen) > 1:
        raise ModelNotFoundError(model_id, f"Model {model_id!r} is split in {len(chosen)} files ({chosen[0]}, ...); "
                                           f"tgi_nb loads one-file GGUFs: join them with llama.cpp's "
                                           f"`llama-gguf-split --merge {chosen[0]} merged.gguf` and pass merged.gguf, "
                                           f"or pick a quant in one file ({', '.join(available_quants(files))}).")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, chosen[0], revision=revision, token=_token(token),
                                    local_files_only=_offline()))
    except Exception as e:
        why = f"the Hub could not be reached ({_root_cause(e)})" if _unreachable(e) else f"{type(e).__name__}: {e}"
        raise ModelNotFoundError(model_id, f"Model {model_id!r}: {chosen[0]} is not in the Hugging Face cache and "
                                           f"could not be downloaded: {why}") from e


def _token(token: Optional[str]) -> Optional[str]:
    return token or os.environ.get("HF_TOKEN") or None


def gguf_hint(repo: str, revision: Optional[str], token: Optional[str]) -> str:
    """For a repository asked for without a tag: how to name one of its GGUF files ("" when it has none, or they
    cannot be listed).

    Example:
        >>> gguf_hint("no-such-org/no-such-repo", None, None)          # doctest: +SKIP
        ''
    """
    try:
        files, _ = _repo_files(repo, repo, revision, token)
    except ModelNotFoundError:
        return ""
    quants = available_quants(files or [])
    return f"; it holds GGUF files: name a quant as {repo}:<quant> ({', '.join(quants)})" if quants else ""


def _repo_files(model_id: str, repo: str, revision: Optional[str],
                token: Optional[str]) -> tuple[Optional[list[str]], str]:
    """The repository's files and where they were listed ("on the Hub", "in the Hugging Face cache"); None and why
    when neither could list any."""
    if not _offline():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HFValidationError

        try:
            return HfApi().list_repo_files(repo, revision=revision, token=_token(token)), "on the Hub"
        except HFValidationError as e:
            raise ModelNotFoundError(model_id, f"{repo!r} is not a valid Hugging Face repo id ({e})") from e
        except Exception as e:
            if not _unreachable(e):
                raise ModelNotFoundError(model_id, f"Hub repo {repo!r} could not be listed: "
                                                   f"{type(e).__name__}: {e}") from e
            why = f"the Hub could not be reached ({_root_cause(e)})"
    else:
        why = "HF_HUB_OFFLINE is set"
    cached = _cached_files(repo, revision)
    return (cached, "in the Hugging Face cache") if cached else (None, why)


def _cached_files(repo: str, revision: Optional[str]) -> list[str]:
    """The GGUF files of ``repo`` in the Hugging Face cache (huggingface_hub's layout: models--user--repo, refs/<rev>
    holding a commit, snapshots/<commit>/ the files), for the revision asked for (default main)."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    ref = folder / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        return []
    return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf"))
