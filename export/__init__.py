"""Export: a SmolVLM2 checkpoint -> an artifact folder (one module per format: gguf.py, mlx.py, onnx.py, coreml.py).

Each format module provides
    export(source: ModelSource, out: Path, quant: str, *, force: bool, progress: bool, image_size: int | None,
           **options) -> Path
and writes through pocketvlm.manifest.atomic_output, the manifest last. Its quants and options are declared in the
format registry (pocketvlm.formats), which export_model checks them against. Modules are imported only when used,
so a missing optional dependency only matters for its own format.
"""

from __future__ import annotations

from pathlib import Path

from pocketvlm import formats
from pocketvlm.errors import PocketVLMError
from pocketvlm.manifest import check_output
from pocketvlm.models import resolve_source
from pocketvlm.paths import user_path
from pocketvlm.prompt import check_image_size


def export_model(source: str, fmt: str, out: Path, *, quant: str | None = None, force: bool = False,
                 progress: bool = True, image_size: int | None = None, **options) -> Path:
    """Resolve SOURCE, check the quant and options against the format's descriptor, and run its exporter.
    image_size: the artifact's image budget (written into its processor config and manifest), for every format."""
    descriptor = formats.get(fmt, exportable=True)
    quant = descriptor.check_quant(quant or descriptor.default_quant)
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - {o.name for o in descriptor.options})
    if unknown:
        names = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise PocketVLMError(f"{names} does not apply to {fmt} exports")
    if image_size is not None:
        check_image_size(image_size)
    module = descriptor.stage("export")
    from pocketvlm.adapters import (adapter_base, base_record, is_peft_adapter, named_base_paths,
                                    read_peft_adapter)

    if is_peft_adapter(user_path(source)):  # a LoRA adapter: an adapter artifact of this format
        if not hasattr(module, "export_adapter"):
            raise PocketVLMError(f"LoRA adapters export to gguf and mlx, which apply them at run time; for {fmt}, "
                                 f"export the merged model (the folder pocketvlm finetune wrote around the adapter)")
        if image_size is not None or quant != descriptor.default_quant or given:
            raise PocketVLMError("--quant, --image-size and format options do not apply to an adapter (it is applied "
                                 "to a base artifact, which has them)")
        adapter = read_peft_adapter(user_path(source))
        base_record(adapter)  # an adapter whose base weights cannot be verified is refused before any work
        base = adapter_base(adapter)
        # every input is protected like a source: the adapter, the folder its config is read from, and the base
        # it names (the model it will be applied to)
        check_output(Path(out), force=force, protect=(adapter.path, base, *named_base_paths(adapter)))
        return module.export_adapter(adapter, base, Path(out), force=force, progress=progress)
    src = resolve_source(source)
    check_output(Path(out), force=force, protect=(src.path,))  # never the source, nor a folder holding it
    return module.export(src, Path(out), quant, force=force, progress=progress, image_size=image_size, **given)
