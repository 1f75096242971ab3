"""The embedding model: loads sentence-transformers offline and turns texts into unit vectors.

Backends: torch (cpu, cuda or mps; fp32, fp16 or bf16), ONNX, and ONNX dynamically quantized to
int8 for CPU workers. ONNX files are exported once from the local model into a cache folder;
nothing is ever downloaded. :attr:`Encoder.backend_tag` names backend and precision, and travels
in every embedding message so that vectors of different backends are never mixed unknowingly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from vecpipe.config import DEFAULT_MODEL_ID, ModelConfig, default_model_path
from vecpipe.errors import ConfigError, ModelOutOfMemory

__all__ = [
    "Encoder",
    "model_label",
    "model_revision",
    "normalize",
    "quantization_target",
    "vector_norm",
    "vector_problem",
]


def offline() -> None:
    """Weights live on disk beside the code: no hub lookup may ever happen, not even a HEAD
    request. Set before sentence-transformers (and so huggingface_hub) is first imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def vector_norm(vec: npt.NDArray[np.float32]) -> float:
    """The Euclidean length of ``vec``, computed in float64."""
    return float(np.linalg.norm(np.asarray(vec, dtype=np.float64)))


def vector_problem(vec: npt.NDArray[np.float32]) -> str | None:
    """Why ``vec`` cannot be stored or searched ("a zero vector..."), or None when it can."""
    if not np.all(np.isfinite(vec)):
        return "a vector with NaN or infinite values"
    if vector_norm(vec) == 0.0:
        return "a zero vector, which has no direction"
    return None


def normalize(vec: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """``vec`` scaled to unit length, as float32: what cosine and inner-product tables store and
    what their queries must be. ``vec`` must pass :func:`vector_problem`."""
    return (np.asarray(vec, dtype=np.float32) / vector_norm(vec)).astype(np.float32)


def model_label(cfg: ModelConfig) -> str:
    """The model's name as recorded with its vectors: stable across machines and installs."""
    if cfg.label:
        return cfg.label
    path = Path(cfg.name)
    if not path.is_dir():
        return cfg.name
    if path.resolve() == Path(default_model_path()).resolve():
        return DEFAULT_MODEL_ID
    return path.name


def model_revision(path: str) -> str:
    """A revision for a local model folder: its config's commit hash, else a digest of it."""
    folder = Path(path)
    if not folder.is_dir():
        return ""
    for name in ("config_sentence_transformers.json", "config.json"):
        cfg = folder / name
        if cfg.exists():
            try:
                data = json.loads(cfg.read_text())
            except json.JSONDecodeError:
                continue
            rev = data.get("_commit_hash") or data.get("revision")
            if rev:
                return str(rev)
    digest = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir() if p.suffix == ".json"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:12]


def quantization_target() -> str:
    """The int8 quantization config for this CPU: avx512_vnni, avx512, avx2 or arm64."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    for target, needed in (("avx512_vnni", {"avx512_vnni"}), ("avx512", {"avx512f"}),
                           ("avx2", {"avx2"})):
        if needed <= flags:
            return target
    return "arm64"


def _int8_files(folder: Path) -> list[Path]:
    # optimum names them model_qint8_avx512_vnni.onnx, model_quint8_avx2.onnx, ...
    return sorted((folder / "onnx").glob(f"model_*int8_{quantization_target()}.onnx"))


def _int8_file(folder: Path) -> Path:
    found = _int8_files(folder)
    if not found:
        raise ConfigError(
            f"No int8 ONNX model for {quantization_target()} in {folder}; delete the folder "
            "(model.cache_dir, VECPIPE_MODEL_CACHE_DIR) so that it is exported again."
        )
    return found[0]


def _is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return "out of memory" in text or "outofmemory" in text or isinstance(exc, MemoryError)


class Encoder:
    """A loaded sentence-transformers model with the configured backend and precision."""

    def __init__(self, cfg: ModelConfig) -> None:
        offline()
        self.cfg = cfg
        self.device = self._device(cfg.device)
        self.name = model_label(cfg)
        self.revision = cfg.revision or model_revision(cfg.name)
        self.backend_tag = f"{cfg.backend}-{cfg.precision}" if cfg.backend == "torch" else (
            f"onnx-int8-{quantization_target()}" if cfg.backend == "onnx-int8" else "onnx-fp32")
        self.model = self._load()
        dimension = (getattr(self.model, "get_embedding_dimension", None)
                     or self.model.get_sentence_embedding_dimension)
        self.dimension = int(dimension() or 0)
        self.max_seq_length = int(self.model.max_seq_length)
        self.tokenizer = self.model.tokenizer
        self.calls = 0

    @staticmethod
    def _device(device: str) -> str:
        if device != "auto":
            return device
        import torch

        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"

    def _load(self) -> Any:
        from sentence_transformers import SentenceTransformer

        cfg = self.cfg
        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        try:
            if cfg.backend == "torch":
                model = SentenceTransformer(cfg.name, device=self.device, local_files_only=True)
                # transformers 5 keeps a checkpoint's own dtype; the configured precision wins.
                if cfg.precision == "fp32":
                    model = model.float()
                elif cfg.precision == "fp16":
                    model = model.half()
                elif cfg.precision == "bf16":
                    import torch

                    model = model.to(torch.bfloat16)
                return model
            folder = self._onnx_folder()
            file_name = (_int8_file(folder).relative_to(folder).as_posix()
                         if cfg.backend == "onnx-int8" else "onnx/model.onnx")
            return SentenceTransformer(
                str(folder), device="cpu", backend="onnx", local_files_only=True,
                model_kwargs={"file_name": file_name, "provider": "CPUExecutionProvider"},
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"Cannot load the model {cfg.name!r} (model.name, VECPIPE_MODEL) offline: "
                f"{str(exc).splitlines()[0]}; give a local sentence-transformers folder."
            ) from None

    def _onnx_folder(self) -> Path:
        """A copy of the local model with ONNX files exported (and quantized) once, cached."""
        src = Path(self.cfg.name)
        if not src.is_dir():
            raise ConfigError(
                f"model.backend {self.cfg.backend} needs a local model folder to export from, "
                f"but model.name is {self.cfg.name!r}."
            )
        key = hashlib.sha256(f"{src.resolve()}:{self.revision}".encode()).hexdigest()[:12]
        folder = Path(self.cfg.cache_dir) / f"{src.name}-{key}-onnx"
        fp32 = folder / "onnx" / "model.onnx"
        if not fp32.exists():
            from sentence_transformers import SentenceTransformer

            tmp = folder.with_suffix(".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("onnx", "openvino"))
            model = SentenceTransformer(str(tmp), device="cpu", backend="onnx",
                                        local_files_only=True)
            model.save_pretrained(str(tmp))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        if self.cfg.backend == "onnx-int8" and not _int8_files(folder):
            from sentence_transformers import (
                SentenceTransformer,
                export_dynamic_quantized_onnx_model,
            )

            model = SentenceTransformer(str(folder), device="cpu", backend="onnx",
                                        local_files_only=True)
            export_dynamic_quantized_onnx_model(model, quantization_target(), str(folder))
        return folder

    def count_tokens(self, text: str) -> int:
        """Tokens the model would see for ``text`` (capped at its max sequence length)."""
        ids = self.tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"]
        return min(len(ids), self.max_seq_length)

    def encode(self, texts: list[str], batch_size: int | None = None) -> npt.NDArray[np.float32]:
        """Embed ``texts`` into float32 rows; out-of-memory is raised as :class:`ModelOutOfMemory`.

        Rows are not normalized here: the caller normalizes (and rejects zero or NaN rows).
        """
        self.calls += 1
        try:
            out = self.model.encode(
                texts, batch_size=batch_size or len(texts) or 1, convert_to_numpy=True,
                normalize_embeddings=False, show_progress_bar=False,
            )
        except Exception as exc:
            if _is_oom(exc):
                if self.device == "cuda":
                    import torch

                    torch.cuda.empty_cache()
                raise ModelOutOfMemory(f"out of memory encoding {len(texts)} texts: {exc}") from exc
            raise
        return np.asarray(out, dtype=np.float32)
