"""`dr serve`: the model behind an OpenAI-compatible HTTP API and a web page (model/serve/)."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from deepresonance_cli.infer import (
    Base,
    CkptRoot,
    Delta,
    Device,
    Dtype,
    LoraAlpha,
    OriginalConfigs,
    Variant,
    default_device,
    load,
    model_config,
)
from deepresonance_cli.options import DtypeChoice, VariantChoice
from model.config import GenerationConfig
from model.serve.limits import Limits

Opt = typer.Option
console = Console(stderr=True)


def is_loopback(host: str) -> bool:
    """Whether `host` only takes connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def demo_checkpoints(folder: Path, variant: str) -> tuple[Path, Path]:
    """(checkpoint root, trained delta) of `dr demo`'s output in `folder`; trains the quick demo there first if it is
    not there yet (about half a minute on a CPU, no downloads)."""
    delta = folder / f"{variant}_stage2"
    if not (folder / "results" / f"trained_{variant}.json").is_file():  # written once stage 2 has finished
        from demo.pipeline import run_demo

        console.print(f"no demo model in {folder}: training the quick demo there once")
        run_demo(folder, variant, quick=True, progress=False, on_step=lambda s: console.print(f"demo: {s}"))
    return folder / "ckpt", delta


def serve(
    variant: Variant = "alpha",
    ckpt_root: CkptRoot = Path("ckpt"),
    base: Base = None,
    delta: Delta = None,
    device: Device = None,
    dtype: Dtype = None,
    lora_alpha: LoraAlpha = None,
    config: OriginalConfigs = None,
    host: Annotated[str, Opt(help="Address to bind; anything but loopback needs --api-key.")] = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[
        str | None, Opt(envvar="DR_API_KEY", help="Bearer token clients must send (or set $DR_API_KEY).")
    ] = None,
    demo: Annotated[bool, Opt(help="Serve `dr demo`'s tiny trained model (trained once if missing).")] = False,
    demo_dir: Annotated[Path, Opt(help="Where `dr demo`'s output is (or goes).")] = Path("runs/demo"),
    cors_origin: Annotated[
        list[str] | None, Opt(help="A browser origin whose pages may call the API (repeat for more); others get 403.")
    ] = None,
    slots: Annotated[int | None, Opt(help="Rows decoding together (default: 64 on CUDA, 8 on CPU).")] = None,
    max_new_tokens: Annotated[
        int, Opt(help="The largest max_tokens a request may ask for.")
    ] = GenerationConfig.max_new_tokens,
    max_pending: Annotated[int, Opt(help="Requests queued or decoding at once; more get 429.")] = Limits.max_pending,
    max_body_mb: Annotated[
        float, Opt(help="Largest request body (base64 media included), MiB.")
    ] = Limits.max_body_bytes / 2**20,
    body_timeout: Annotated[
        float, Opt(help="Seconds a request body may take to arrive; then 408.")
    ] = Limits.body_timeout_s,
    max_media: Annotated[int, Opt(help="Media items per prompt.")] = Limits.max_media,
    decode_timeout: Annotated[
        float, Opt(help="Seconds a request's own media decoding may take.")
    ] = Limits.decode_timeout_s,
    eager: Annotated[bool, Opt(help="Decode without torch.compile and CUDA graphs (no compile wait on CUDA).")] = False,
) -> None:
    """Serve the model: OpenAI's Chat Completions API at /v1, a page to ask about your music at /."""
    if not is_loopback(host) and not api_key:
        raise typer.BadParameter(
            f"binding {host} opens the server to other machines: give --api-key", param_hint="--host"
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)], force=True)
    variant, dtype = VariantChoice(variant).value, DtypeChoice(dtype).value if dtype else None  # choices as names
    device = default_device(device)
    model_id = f"deepresonance-{variant}"
    if demo:
        ckpt_root, delta = demo_checkpoints(demo_dir, variant)
        model_id += "-demo"
    # the LLaMA weights' read onto a GPU begins in `load`, before the model's packages (and these) are imported
    model = load(ckpt_root, variant, base, delta, device, dtype, model_config(config, lora_alpha))
    import uvicorn

    from model.engine.scheduler import Engine
    from model.engine.sizing import default_slots
    from model.serve.app import create_app
    from model.serve.worker import EngineWorker

    slots = slots or default_slots(device, "server")
    engine = Engine.sized(model, model.config.max_length, max_new_tokens, slots, compile=False if eager else None)
    limits = Limits(
        max_body_bytes=int(max_body_mb * 2**20),
        body_timeout_s=body_timeout,
        max_media=max_media,
        decode_timeout_s=decode_timeout,
        max_pending=max_pending,
    )
    worker = EngineWorker(model, engine, limits.max_pending)
    defaults = GenerationConfig(max_new_tokens=max_new_tokens)
    app = create_app(worker, model_id, api_key, limits, defaults, host, cors_origin or ())
    console.print(f"{model_id} on {device}: {engine.slots} slots; http://{host}:{port}/ (API at /v1)")
    uvicorn.run(app, host=host, port=port, log_level="info")
