"""The `bonsai-convert` command line (typer + rich). Errors: one line on stderr, exit code by class."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .errors import BonsaiError, UsageError, VerifyFailed
from .vocabulary import KERNEL_MODES, PACK_VARIANTS, TARGETS, VARIANTS


def choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum of `values` (each member named as its value) for a typer option."""
    return Enum(name, {choice: choice for choice in values}, type=str)  # type: ignore[return-value]


# Every choice on the command line is an Enum: click refuses any other value as a usage error (exit 2) listing them.
# The words come from bonsai_convert.vocabulary, where each is defined once.
TargetName = choices("TargetName", TARGETS)
VariantName = choices("VariantName", VARIANTS)
PackVariant = choices("PackVariant", PACK_VARIANTS)
KernelMode = choices("KernelMode", KERNEL_MODES)


class Quantizer(str, Enum):
    absmean = "absmean"


class DenseDtype(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"


class MemoryDevice(str, Enum):
    gpu = "gpu"
    cpu = "cpu"


class ComputeDtype(str, Enum):
    float16 = "float16"
    float32 = "float32"
    bfloat16 = "bfloat16"


def value(choice: Enum | None) -> str | None:
    return None if choice is None else str(choice.value)


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Pack trained binary/ternary FLUX.2 Klein models into device bundles, verify, publish.",
)
console = Console(stderr=True)
state = {"debug": False}


class PackProgress:
    """Rich progress bar over tensors (stderr), silent when not a terminal."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._task = None

    def start(self, description: str, total: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def tick(self) -> None:
        if self._task is not None:
            self._progress.advance(self._task)

    def message(self, text: str) -> None:
        self._progress.console.print(f"[dim]{text}[/dim]")

    def done(self) -> None:
        self._progress.stop()


@app.callback()
def main_options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    """--debug anywhere on the line shows tracebacks (handled in main)."""


@app.command()
def demo(
    out: Path = typer.Argument(..., help="Folder to write the tiny demo checkpoint to."),
    variant: VariantName = typer.Option("ternary", help="binary or ternary"),
    seed: int = typer.Option(0, help="Random seed."),
    force: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Write the offline demo checkpoint (tiny FLUX.2 Klein, diffusers layout, exact low-bit weights)."""
    from .atomic import atomic_folder
    from .demo import write_demo

    with atomic_folder(out, force) as folder:
        write_demo(folder, variant.value, seed)
    console.print(f"wrote demo checkpoint ({variant.value}, seed {seed}) to {out}")


@app.command()
def pack(
    source: str = typer.Argument(..., help="diffusers folder, packed bundle, BFL .safetensors, or demo:binary|ternary"),
    target: TargetName = typer.Option(..., "--target", "-t", help="Device target."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to create."),
    variant: PackVariant = typer.Option("auto", help="auto (detect), binary or ternary"),
    quantize: Quantizer | None = typer.Option(None, help="absmean: lossy projection of full-precision weights"),
    dtype: DenseDtype | None = typer.Option(
        None, help="Dense float dtype: bfloat16 (MLX default, what the released loaders read) or float16."
    ),
    force: bool = typer.Option(False, help="Replace OUT if it exists; write even if it does not fit the device."),
    golden: bool = typer.Option(True, "--golden/--no-golden", help="Store the reference output for verify."),
    golden_size: int | None = typer.Option(None, help="Golden image size (default 64 small / 256 full-size)."),
) -> None:
    """Pack SOURCE into a bundle for a target, with manifest and golden record."""
    from .pack import PackOptions
    from .pack import pack as run_pack

    options = PackOptions(
        target=str(value(target)),
        variant=str(value(variant)),
        quantize=value(quantize),
        force=force,
        golden=golden,
        golden_size=golden_size,
        dtype=value(dtype),
    )
    manifest = run_pack(source, out, options, PackProgress())
    console.print(
        f"wrote {out}: {manifest['target']} {manifest['variant']}, {manifest['total_bytes']:,} bytes, "
        f"{manifest['bits_per_weight']['low_bit_linears']:.4f} bpw low-bit linears"
        + ("" if manifest["exact"] else " (LOSSY: --quantize)")
    )


@app.command()
def inspect(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show a bundle's sizes, bits per weight and reductions vs FP16."""
    from .inspect import inspect_bundle, print_table

    report = inspect_bundle(bundle)
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print_table(report, Console())


@app.command()
def generate(
    bundle: Path = typer.Argument(..., help="Bundle folder (iphone, ipad, mac or cuda)."),
    prompt: str = typer.Option(..., help="Text prompt."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG file to write."),
    seed: int = typer.Option(0, help="Seed of the shared numpy initial noise."),
    steps: int | None = typer.Option(None, help="Denoising steps (default: the bundle's, 4)."),
    size: str | None = typer.Option(None, help="WxH (default: the device profile's)."),
    dtype: ComputeDtype | None = typer.Option(None, help="Compute dtype: float16 (default) or float32."),
) -> None:
    """Generate an image from a bundle with its target's reference runtime."""
    from .runtimes import enable_runtime_speedups

    enable_runtime_speedups()  # before anything imports MLX
    import io
    import time

    from PIL import Image
    from rich.progress import Progress

    from .manifest import load_manifest
    from .plan import parse_size
    from .runtimes import generate as run_generate

    manifest = load_manifest(bundle)
    if manifest["transformer_only"]:
        raise UsageError(f"{bundle}: a transformer-only bundle cannot generate (no text encoder / VAE)")
    width, height = parse_size(size, manifest["profile"])
    if steps is not None and steps < 1:
        raise UsageError("--steps must be at least 1")
    total = steps or 4
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("denoising", total=total)
        last = {"time": time.perf_counter()}

        def on_step(step: int, count: int, seconds: float) -> None:
            progress.update(
                task, total=count, completed=step + 1, description=f"step {step + 1}/{count} ({seconds:.2f} s)"
            )
            last["time"] = time.perf_counter()

        started = time.perf_counter()
        result = run_generate(
            bundle, manifest["target"], prompt, seed, steps, width, height, dtype=value(dtype), on_step=on_step
        )
    if result.truncated:
        console.print("warning: the prompt was longer than the text encoder's 512 tokens and was truncated")
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(result.image).save(buffer, format="PNG")
    write_atomically(out, buffer.getvalue())
    per_step = ", ".join(f"{s:.2f}" for s in result.step_seconds)
    peak = f"{result.peak_memory_bytes / 1e9:.3f} GB" if result.peak_memory_bytes else "n/a"
    console.print(
        f"wrote {out} ({width}×{height}, {len(result.step_seconds)} steps: {per_step} s/step; "
        f"total {time.perf_counter() - started:.1f} s; peak memory {peak}; runtime {result.backend})"
    )


@app.command()
def tune(bundle: Path = typer.Argument(..., help="A cuda bundle.")) -> None:
    """GPU only: autotune Gemlite's kernels for this bundle's shapes once and store the cache in the bundle."""
    from .tune import tune_bundle

    result = tune_bundle(bundle)
    console.print(
        f"stored {result['cache']} for {result['gpu']}: time to first image at {result['size']} "
        f"cold {result['cold_seconds']:.1f} s → warm {result['warm_seconds']:.1f} s (re-run verify before publishing)"
    )


@app.command()
def plan(
    target: TargetName = typer.Option(..., "--target", "-t", help="Device target."),
    variant: VariantName = typer.Option(..., help="binary or ternary"),
    model: str = typer.Option("klein-4b", help="klein-4b (built in) or a source folder/file (headers only)"),
    size: str | None = typer.Option(None, help="WxH for the memory estimate (default: the profile's)"),
    device: MemoryDevice = typer.Option(
        MemoryDevice.gpu, help="Memory model of the profile's GPU, or of MLX's CPU backend (formats/memory.md)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Predict a bundle's bytes per component and its memory during generation, from shapes alone."""
    from .inspect import print_table
    from .plan import describe_source, klein_4b, parse_size
    from .plan import plan as make_plan
    from .profiles import profile_for

    target, variant = target.value, variant.value  # type: ignore[assignment]
    width, height = parse_size(size, profile_for(target))
    description = klein_4b() if model == "klein-4b" else describe_source(model)
    report = make_plan(description, target, variant, width, height, device=device.value)
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return
    out = Console()
    packed = None
    if target != "packed":
        packed = make_plan(description, "packed", variant, width, height, device=device.value)
    print_table(report, out, packed)
    memory = report["memory"]
    verdict = "[green]fits[/green]" if memory["fits"] else "[red]does not fit[/red]"
    out.print(
        f"memory at {width}×{height} ({memory['compute_dtype']}, {memory['device']}): "
        f"peak {memory['peak_bytes'] / 1e9:.2f} GB, "
        f"mean active {memory['mean_active_bytes'] / 1e9:.2f} GB; budget {memory['budget_bytes'] / 1e9:.2f} GB "
        f"→ {verdict} (margin {memory['margin_bytes'] / 1e9:+.2f} GB)"
    )


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    source: str | None = typer.Option(None, help="Compare the weights bit for bit against this source."),
    report: Path | None = typer.Option(None, help="Write the JSON report here."),
    image: Path | None = typer.Option(None, help="Write reference | bundle | difference as PNG here."),
    generate: bool = typer.Option(True, "--generate/--no-generate", help="Run the golden-image check."),
    min_psnr: float | None = typer.Option(None, help="Minimum PSNR in dB (default 40 fp32, 35 fp16)."),
    dtype: ComputeDtype | None = typer.Option(None, help="Runtime compute dtype (default: the golden record's)."),
    kernels: KernelMode = typer.Option(
        "auto",
        help="cuda bundles without a GPU: 'interpreter' runs gemlite's own kernels on every low-bit layer (Triton "
        "interpreter, required), 'fallback' only our decoder, 'auto' the interpreter when installed.",
    ),
) -> None:
    """The release gate: integrity, bit-exact weights, and the golden image. Exit 0 only if all checks pass."""
    from .runtimes import enable_runtime_speedups

    enable_runtime_speedups()  # before anything imports MLX
    from rich.table import Table

    from .schemas import validate
    from .verify import VerifyOptions, report_json, verify_bundle
    from .verify_record import record_pass

    options = VerifyOptions(
        source=source,
        generate=generate,
        min_psnr=min_psnr,
        image=image,
        dtype=value(dtype),
        kernels=str(value(kernels)),
    )
    result = verify_bundle(bundle, options)
    validate(result, "verify_report", "verify report")
    table = Table(title=f"verify {bundle}")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    for check in result["checks"]:
        shown = {"skipped": "[yellow]skipped[/yellow]", "fail": "[red]FAIL[/red]"}.get(check.get("status", ""))
        table.add_row(
            check["name"], shown or ("[green]pass[/green]" if check["passed"] else "[red]FAIL[/red]"), check["detail"]
        )
    Console().print(table)
    if report:
        write_atomically(report, report_json(result).encode())
    if not result["passed"]:
        failed = next(c for c in result["checks"] if not c["passed"])
        raise VerifyFailed(f"{bundle}: {failed['name']}: {failed['detail']}")
    record_pass(bundle, result)
    psnr = f"{result['psnr_db']:.2f} dB" if result["psnr_db"] is not None else "generation NOT checked"
    Console().print(f"[green]verified[/green] {bundle} ({psnr})")


@app.command()
def publish(
    bundle: Path = typer.Argument(..., help="A verified bundle folder."),
    repo_id: str = typer.Option(..., "--repo-id", help="ORG/NAME on the Hugging Face Hub."),
    private: bool = typer.Option(False, help="Create the repository as private."),
    revision: str | None = typer.Option(None, help="Branch to upload to (created if missing)."),
    commit_message: str | None = typer.Option(None, help="Commit message."),
    dry_run: bool = typer.Option(False, help="Build the card and print the upload plan; no network."),
    card_out: Path | None = typer.Option(None, help="Also write the model card (README.md) here."),
    allow_unverified: bool = typer.Option(False, help="Publish without a passing verify result (not advised)."),
) -> None:
    """Upload a verified bundle with its model card, then check the Hub holds exactly the manifest's bytes."""
    from .publish import publish as run_publish

    result = run_publish(
        bundle,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        dry_run=dry_run,
        card_out=card_out,
        allow_unverified=allow_unverified,
        console=Console(),
    )
    if not result.dry_run:
        console.print(
            f"published {len(result.files)} files ({result.total_bytes:,} bytes) to {result.repo_id}@{result.revision};"
            " every file's size and sha256 on the Hub match the manifest"
        )


def write_atomically(path: Path, data: bytes) -> None:
    """Write a file through a temporary sibling and a rename (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_bytes(data)
    temporary.replace(path)


def main() -> None:
    """Console-script entry: run the app, turning expected errors into one line and an exit code."""
    debug = "--debug" in sys.argv[1:]
    args = [arg for arg in sys.argv[1:] if arg != "--debug"]
    state["debug"] = debug
    try:
        code = app(args=args, standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into a return code when not in standalone mode
            console.print("error: interrupted (no partial output was left)", markup=False)
            sys.exit(130)
        if isinstance(code, int) and code:
            sys.exit(code)
    except BonsaiError as error:
        if debug:
            raise
        console.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        console.print("error: interrupted (no partial output was left)", markup=False)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - usage errors of click and anything unexpected
        kind = type(error).__name__
        if kind == "Exit":
            sys.exit(getattr(error, "exit_code", 0))
        if kind == "Abort":
            console.print("error: aborted", markup=False)
            sys.exit(130)
        if hasattr(error, "format_message"):  # a click usage error: bad option, missing argument
            console.print(f"error: {error.format_message()}", markup=False, soft_wrap=True)
            sys.exit(UsageError.exit_code)
        if debug:
            raise
        console.print(f"error: internal error: {kind}: {error} (rerun with --debug)", markup=False, soft_wrap=True)
        sys.exit(1)
