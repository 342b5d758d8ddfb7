"""Command line: parse options, call the library, print. Heavy imports happen inside commands.

Exit codes: 0 success, 2 bad input (one `error: ...` line on stderr).
"""

import sys
from pathlib import Path

import click

from swtool import __version__

PROMPT_HELP = 'Detection prompt (default: the paper\'s "Apple Inc. is a worldwide tech company.").'
FORCE_HELP = "Replace output files that already exist (without it, an existing output is an error)."
DOWNLOAD_HELP = ("A Hugging Face id missing from the local cache: download its config, tokenizer and "
                 "safetensors (only those).")


class SwtoolGroup(click.Group):
    """Turns SwtoolError (bad input) into one line and exit code 2; --debug adds the traceback.

    SIGINT, SIGTERM and SIGHUP unwind as exceptions, so every output being written
    is removed (swtool/atomic.py) before the one line and exit code 128 + signal.
    """

    def parse_args(self, ctx, args):
        """--debug is the group's option, but users type it anywhere: moved to the front (not past `--`)."""
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[1:end]:
            args = ["--debug"] + [a for a in args[:end] if a != "--debug"] + args[end:]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        from swtool.atomic import Terminated, install_signal_handlers
        from swtool.errors import SwtoolError

        install_signal_handlers()
        for stream in (sys.stdout, sys.stderr):  # a path or token that is not valid UTF-8 prints escaped
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        try:
            return super().invoke(ctx)
        except SwtoolError as e:
            fail(ctx, str(e), 2)
        except click.UsageError as e:  # a missing or malformed option: one line too, not click's usage block
            fail(ctx, e.format_message(), 2)
        except OSError as e:  # unreadable or unwritable paths, full disks
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            fail(ctx, f"{where}{e.strerror or e}", 2)
        except KeyboardInterrupt:
            fail(ctx, "interrupted (SIGINT); outputs in progress were removed", 130)
        except Terminated as e:
            fail(ctx, f"terminated ({e.name}); outputs in progress were removed", 128 + e.signum)


def run():
    """The `swtool` console script: main(), then leave without Python's interpreter teardown.

    Once numba has been loaded, tearing the interpreter down (its modules, their objects,
    LLVM) takes about 0.1 s on the benchmark machine: a sixth of a small scan, for no
    output. So after the command has finished and stdout and stderr are flushed, the
    process ends with os._exit and the command's exit code. Every output file is complete
    and renamed into place before a command returns (swtool/atomic.py), and swtool runs no
    background threads, so nothing is cut short. main() itself, as tests and bench scripts
    call it in process, still raises SystemExit as click does.

    The cyclic garbage collector's youngest generation is collected every 10,000 new
    container objects instead of Python's 700, so the older ones, collected every tenth
    time, are rescanned less: importing numba and loading its first kernel create
    hundreds of thousands of objects, and rescanning them took 68 ms of a Llama-7B-shape
    scan's 2.4 s, 31 ms with these thresholds (measured with gc.callbacks, same scan).
    Cycles are still collected, in fewer, larger batches.
    """
    import gc
    import os

    gc.set_threshold(10_000, 10, 10)
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if not isinstance(code, int):  # SystemExit("message") or SystemExit(None), as sys.exit has them
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: let the interpreter report it as usual
        sys.exit(code)
    os._exit(code)


def fail(ctx, message, code):
    """One `error: ...` line on stderr (after the traceback with --debug), then exit `code`. A line break the
    message quotes from its input (a path, a name in a file) is printed escaped, as repr() would."""
    if ctx.params.get("debug"):
        import traceback

        traceback.print_exc()
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def output_options(json_help=None, progress_help="No progress bar on stderr.", force_help=FORCE_HELP):
    """The output options commands share: --json, --no-progress, --force (None leaves one out)."""
    flags = [("--force", "force", force_help), ("--no-progress", "no_progress", progress_help),
             ("--json", "as_json", json_help)]

    def decorate(command):
        for flag, name, help_text in flags:
            if help_text:
                command = click.option(flag, name, is_flag=True, help=help_text)(command)
        return command

    return decorate


STDOUT = "-"  # -o -: the output's bytes on stdout, and nothing else there (tables and notes go to stderr)


def prepare_outputs(force, *paths, plot=None, inputs=()):
    """Before any work: an output that is one of the `inputs`' files, or named twice, is refused;
    an existing output is refused unless --force; a plot needs matplotlib. `-` is stdout."""
    from swtool.atomic import check_destination, refuse_replacing_inputs

    paths = tuple(path for path in paths if path != STDOUT)
    refuse_replacing_inputs((*paths, plot), inputs)
    if plot:
        from swtool.plot import require_matplotlib

        require_matplotlib(plot)
    for path in (*paths, plot):
        if path:
            check_destination(path, force)


def no_stdout_directory(option, path):
    """A directory output cannot be `-`: one line."""
    if path == STDOUT:
        raise click.UsageError(f"{option} -: a directory is written there, which stdout cannot hold; name a directory")


def model_argument(command):
    """MODEL and --download, the same on every command that reads a model (checkpoint/source.py)."""
    command = click.option("--download", is_flag=True, help=DOWNLOAD_HELP)(command)
    return click.argument("model", type=click.Path())(command)


def use_threads(n):
    """-t N: swtool's Numba kernels, and NumPy's BLAS when it is not loaded yet, on N threads (None: as
    the environment says, by default every core). Environment variables where the library is not
    loaded yet (a real process: nothing is, so `swtool --help` stays instant), numba.set_num_threads
    where it is (in process, at most the pool numba started with)."""
    import os

    if n is None:
        return
    if "numba" in sys.modules:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    else:
        os.environ["NUMBA_NUM_THREADS"] = str(n)
    if "numpy" not in sys.modules:  # BLAS reads these when numpy loads it
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(n)


def threads_option(expose=False, help_text="Compute on N threads (default: every core, or NUMBA_NUM_THREADS)."):
    """-t/--threads N, the same on every command that computes; applied as soon as it is parsed."""
    return click.option("-t", "--threads", type=click.IntRange(min=1), default=None, metavar="N", help=help_text,
                        expose_value=expose, callback=lambda ctx, param, value: (use_threads(value), value)[1])


def resolve_model(spec, download, missing_hint=None):
    """The local file or directory MODEL names (a path as given, or a Hub id's cached snapshot, fetched
    first with --download), or the one-line error. Every command resolves its MODEL here before reading
    it; the library then finds an id in the cache, so MODEL keeps the name the user gave."""
    from swtool.checkpoint.source import resolve_source

    return resolve_source(spec, download, missing_hint)


@click.group(cls=SwtoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="swtool")
@click.option("--debug", is_flag=True, help="On an error, print the Python traceback before the one-line message.")
def main(debug):
    """Find, catalog and handle the super weights of LLM checkpoints, on a CPU."""


SCAN_PROMPTS_HELP = ("Detection prompt; repeat it for several, scanned in the same read of the weights "
                     "(default: the built-in set, the paper's \"Apple Inc. is a worldwide tech company.\" first; "
                     "see docs/prompts.md).")


@main.command()
@model_argument
@click.option("--prompt", "prompts", multiple=True, help=SCAN_PROMPTS_HELP)
@click.option("--prompts-file", type=click.Path(dir_okay=False),
              help="UTF-8 text file of prompts, one per line (blank lines skipped), after any --prompt.")
@click.option("--wide", is_flag=True, help="Every measurement in the table (dtype, rank, activations, NLLs), "
                                            "not the compact one.")
@click.option("--max-iter", default=8, show_default=True, type=click.IntRange(1, 64),
              help="Zero what was found and rescan at most this many times.")
@click.option("--spike-ratio", default=10.0, show_default=True, type=click.FloatRange(min=1.0),
              help="A layer spikes when its max |down_proj output| is this many times the median layer's.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the catalog JSON here (- for stdout).")
@click.option("--hash", "with_hashes", is_flag=True, help="Record the sha256 of every weight file.")
@threads_option()
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Write max |down_proj output| per layer, intact and without the found weights (.png/.svg/.pdf; "
                   "needs matplotlib).")
@click.option("--check-finite", is_flag=True,
              help="Read every weight once more and report tensors holding NaN or Inf (done anyway when the "
                   "scan's activations are not finite).")
@output_options(json_help="Print the catalog JSON on stdout instead of a table.")
def scan(model, prompts, prompts_file, wide, max_iter, spike_ratio, output, as_json, with_hashes, no_progress,
         download, plot, check_finite, force):
    """Locate the super weights of MODEL.

    MODEL: a checkpoint directory, a .safetensors or .gguf file, or a Hugging Face id org/name[@revision].

    Every prompt is scanned on its own (its spikes, candidates and verification), all of them as
    extra rows of one read of the weights. Each candidate reports in how many prompts it was found
    and verified; it counts as verified when verified in more than half of them, and as weak otherwise.
    """
    import json

    import numpy as np

    from swtool.catalog import default_prompts, format_scan, scan_catalog, to_json, write_catalog
    from swtool.detect import Settings
    from swtool.finite import describe_nonfinite, nonfinite_weights, report_is_finite
    from swtool.model import load_model
    from swtool.tokenizer import read_prompts

    prepare_outputs(force, output, plot=plot, inputs=(model, prompts_file))
    prompts = list(prompts) + (read_prompts(prompts_file) if prompts_file else [])
    resolve_model(model, download)
    loaded = load_model(model)
    tokens = None  # the prompts given are tokenized by scan_catalog
    if not prompts:
        prompts, tokens, note = default_prompts(loaded)
        if note:
            click.echo(f"note: {note}", err=True)
    settings = Settings(prompt=prompts[0], max_iter=max_iter, spike_ratio=spike_ratio)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # non-finite weights are reported below
        catalog, report = scan_catalog(loaded, prompts, settings, progress=not no_progress, with_hashes=with_hashes,
                                       tokens=tokens)
    if check_finite or not all(map(report_is_finite, report["prompts"])):  # NaN/Inf weights: flagged, the scan still completes
        catalog["nonfinite_weights"] = nonfinite_weights(loaded.checkpoint)
        if catalog["nonfinite_weights"]:
            click.echo(f"warning: {model}: {describe_nonfinite(catalog['nonfinite_weights'])}", err=True)
    if output == STDOUT:
        from swtool.catalog import validate

        text = to_json(catalog)
        validate(json.loads(text), "the catalog")  # as write_catalog checks what it writes
    elif output:
        write_catalog(catalog, output)
    if plot:
        from swtool.plot import plot_scan

        plot_scan(plot, loaded, report)
    if output == STDOUT:  # the catalog alone on stdout, the table on stderr
        click.echo(text, nl=False)
        if not as_json:
            click.echo(format_scan(catalog, wide=wide), err=True)
        if plot:
            click.echo(f"plot written to {plot}", err=True)
    elif as_json:
        click.echo(to_json(catalog), nl=False)
    else:
        click.echo(format_scan(catalog, wide=wide))
        if output:
            click.echo(f"catalog written to {output}")
        if plot:
            click.echo(f"plot written to {plot}")


def _at_least_two(ctx, param, value):
    """--max-tokens: one prediction needs two tokens."""
    if value is not None and value < 2:
        raise click.UsageError(f"--max-tokens must be at least 2, got {value}")
    return value


def text_options(command):
    """The text-scoring options `eval` and `quantsim` share (applied bottom-up, so listed in reverse)."""
    options = [
        click.option("--score-second-half", is_flag=True,
                     help="Score only predictions from position ctx/2 on in each chunk (as llama-perplexity)."),
        click.option("--max-tokens", type=int, callback=_at_least_two, help="Score only the first N tokens of the text."),
        click.option("--ctx", default=512, show_default=True, type=int,
                     help="Tokens per chunk; each chunk is an independent sequence and every prediction in it "
                          "is scored."),
        click.option("--text", "text_path", required=True, type=click.Path(), help="UTF-8 text file to score."),
    ]
    for option in options:
        command = option(command)
    return command


@main.command("eval")
@model_argument
@text_options
@click.option("--zero", multiple=True, metavar="L:ROW:COL",
              help="Zero layer L's down_proj[ROW, COL] on the fly, in every world (repeatable).")
@click.option("--drop-expert", "drop_experts", multiple=True, metavar="L:E",
              help="Mixtures: remove expert E of layer L in every world; the router never picks it and weighs "
                   "the experts it picks instead as the model does (repeatable).")
@click.option("--catalog", type=click.Path(),
              help="A scan catalog. Alone: compare the model with and without its super weights.")
@click.option("--ablate", is_flag=True, help="Evaluate with the catalog's super weights zeroed.")
@click.option("--scale-super", type=float, metavar="S", help="Evaluate with the catalog's super weights times S.")
@click.option("--control-top", type=int, metavar="N",
              help="Compare: the N largest-|w| weights other than the super weights zeroed (the paper's control).")
@click.option("--restore-activation", is_flag=True,
              help="Compare: super weights zeroed, the super activation written back (the paper's restore).")
@click.option("--sweep", metavar="S,S,..", help="Compare: super weights scaled by each factor, e.g. 0,0.5,1,1.5,2,3.")
@click.option("--kld-reference", metavar="REFERENCE",
              help="Also the KL divergence of each world's next-token distributions from REFERENCE's (a model "
                   "with the same vocabulary, e.g. the source of a GGUF), both through swtool's pass, on the "
                   "same chunks: mean, 99th percentile, same top token, as llama-perplexity --kl-divergence.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Write each world's max |down_proj output| per layer as .png/.svg/.pdf (needs matplotlib).")
@click.option("--batch-tokens", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Rows x ctx of one pass; a longer text (or more worlds) takes several passes.")
@threads_option()
@output_options(json_help="Print the result as JSON on stdout instead of a table.")
def eval_command(model, text_path, ctx, max_tokens, score_second_half, zero, drop_experts, catalog, ablate, scale_super,
                 control_top, restore_activation, sweep, kld_reference, plot, batch_tokens, as_json, no_progress,
                 force, download):
    """Perplexity of a text through MODEL, with weights changed on the fly, and the paper's experiments.

    MODEL: a checkpoint directory, a .safetensors or .gguf file, or a Hugging Face id org/name[@revision].
    """
    from swtool.jsonfile import strict_json

    from swtool.ablate import CatalogMismatch
    from swtool.catalog import read_catalog
    from swtool.coordinate import Coordinate
    from swtool.errors import SwtoolError
    from swtool.evaluate import evaluate, make_chunks, text_token_ids
    from swtool.experts import parse_expert
    from swtool.experiments import EvalOptions, build_plan, describe_eval, format_eval, parse_scales, stop_word_ids
    from swtool.model import load_model
    from swtool.tokenizer import load_tokenizer

    prepare_outputs(force, plot=plot, inputs=(model, text_path, catalog, kld_reference))  # before the pass
    options = EvalOptions(zero=tuple(Coordinate.parse(z) for z in zero),
                      super_weights=read_catalog(catalog)["super_weights"] if catalog else None,
                      ablate=ablate, scale_super=scale_super, control_top=control_top,
                      restore_activation=restore_activation, sweep=tuple(parse_scales(sweep)) if sweep else (),
                      drop_experts=tuple(parse_expert(text) for text in drop_experts))
    resolve_model(model, download)
    loaded = load_model(model)
    ids = text_token_ids(loaded.directory, text_path, max_tokens)
    chunks = make_chunks(ids, ctx, score_second_half)
    reference = None
    if kld_reference is not None:  # refused before any pass if its tokens are not the model's
        from swtool.kld import check_same_vocabulary

        resolve_model(kld_reference, download)
        reference = load_model(kld_reference)
        check_same_vocabulary(loaded, reference, ids, text_token_ids(reference.directory, text_path, max_tokens),
                              kld_reference)
    try:
        plan, report = build_plan(loaded, options, progress=not no_progress)
    except CatalogMismatch as e:
        raise SwtoolError(f"{catalog}: {e}") from None
    if reference is None:
        scores, kld = evaluate(loaded, chunks, plan, progress=not no_progress, batch_tokens=batch_tokens), None
    else:
        import tempfile

        from swtool.kld import KldComparison, reference_pass

        with tempfile.TemporaryDirectory(prefix="swtool-kld-") as logits_dir:
            reference_logits, reference_score = reference_pass(reference, chunks, logits_dir, not no_progress,
                                                               batch_tokens)
            comparison = KldComparison(reference_logits, len(plan.worlds))
            scores = evaluate(loaded, chunks, plan, progress=not no_progress, batch_tokens=batch_tokens,
                              logits_sink=comparison)
            del reference_logits
        kld = (kld_reference, reference_score, [world.stats() for world in comparison.worlds])
    tokenizer = load_tokenizer(loaded.directory)
    result = describe_eval(loaded, text_path, len(ids), chunks, plan, report, scores, tokenizer,
                      stop_word_ids(tokenizer), options, kld)
    if plot:
        from swtool.plot import plot_eval

        plot_eval(plot, result, f"{loaded.path}: max |down_proj output| per layer over {text_path}")
    if as_json:
        click.echo(strict_json(result))
    else:
        click.echo(format_eval(result))
        if plot:
            click.echo(f"plot written to {plot}")


@main.command("quantsim")
@model_argument
@text_options
@click.option("--bits", default=4, show_default=True, type=click.IntRange(2, 8), help="Weight bits (INT, min-max).")
@click.option("--block-sizes", default="32,128,1024,16384,tensor", show_default=True, metavar="N,N,..|tensor",
              help="Flat block sizes to compare (elements of W [out, in] in row-major order), or 'tensor'.")
@click.option("--clip", "clip_text", default="zscore:9", show_default=True, metavar="zscore:Z|percentile:P|none",
              help="Super-weight-aware clipping before quantization (the paper's zscore or tensor top fraction).")
@click.option("--catalog", type=click.Path(),
              help="A scan catalog (swtool scan -o); without it MODEL is scanned first with scan's defaults.")
@click.option("--activations", type=click.Choice(["none", "int8"]), default="none", show_default=True,
              help="Also simulate per-tensor int8 inputs of the linears, with and without the super activation kept.")
@click.option("--no-weights", is_flag=True, help="Skip the weight table (with --activations int8).")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Write perplexity per block size (and the activation settings) as .png/.svg/.pdf (needs matplotlib).")
@click.option("--batch-tokens", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Rows x ctx of one pass; a longer text takes several passes.")
@threads_option()
@output_options(json_help="Print the result as JSON on stdout instead of tables.")
def quantsim_command(model, text_path, bits, block_sizes, clip_text, catalog, activations, no_weights, ctx, max_tokens,
                     score_second_half, plot, batch_tokens, as_json, no_progress, force, download):
    """Perplexity of MODEL with simulated quantization (no file written): block-wise INT weights, plain
    round-to-nearest vs super-weight-aware, and optionally int8 activations with the super activation kept.

    MODEL: a checkpoint directory, a .safetensors or .gguf file, or a Hugging Face id org/name[@revision].
    """
    from swtool.jsonfile import strict_json

    from swtool.quantsim import QuantsimOptions, parse_block_sizes, parse_clip

    options = QuantsimOptions(bits=bits, block_sizes=tuple(parse_block_sizes(block_sizes)), clip=parse_clip(clip_text),
                      weights=not no_weights, activations=activations)
    if not options.weights and options.activations == "none":
        raise click.UsageError("--no-weights leaves nothing to do without --activations int8")
    prepare_outputs(force, plot=plot, inputs=(model, text_path, catalog))  # before the passes, not after them
    from swtool.evaluate import make_chunks, text_token_ids
    from swtool.model import load_model
    from swtool.quantsim import describe_run, format_quantsim, run

    resolve_model(model, download)
    loaded = load_model(model)
    ids = text_token_ids(loaded.directory, text_path, max_tokens)
    chunks = make_chunks(ids, ctx, score_second_half)
    super_weights, source = quantsim_super_weights(loaded, catalog, not no_progress)
    result = describe_run(loaded, text_path, len(ids), chunks, source)
    result.update(run(loaded, chunks, super_weights, options, progress=not no_progress, batch_tokens=batch_tokens))
    if plot:
        from swtool.plot import plot_quantsim

        plot_quantsim(plot, result, f"{loaded.path}: perplexity on {text_path} ({result['tokens']} tokens)")
    if as_json:
        click.echo(strict_json(result))
    else:
        click.echo(format_quantsim(result))
        if plot:
            click.echo(f"plot written to {plot}")


def quantsim_super_weights(model, catalog, progress):
    """(catalog entries, where they came from): the catalog's, checked against MODEL element by element, or a scan's."""
    from swtool.ablate import CatalogMismatch, locate
    from swtool.catalog import super_weights_for
    from swtool.errors import SwtoolError

    found, source = super_weights_for(model, catalog, progress=progress)
    try:
        for sw in found["super_weights"] if catalog else ():
            locate(model.checkpoint, sw)
    except CatalogMismatch as e:
        raise SwtoolError(f"{catalog}: {e}") from None
    return found["super_weights"], source


@main.command()
@model_argument
@click.option("--catalog", type=click.Path(), help="The catalog whose super weights to change (swtool scan -o).")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Write the ablated copy to this new directory.")
@click.option("--scale", default=0.0, show_default=True, type=float, help="Multiply the super weights by this (0 removes them).")
@click.option("--only", multiple=True, metavar="L:ROW:COL", help="Only this catalog entry (repeatable).")
@click.option("--drop-expert", "drop_experts", multiple=True, metavar="L:E",
              help="Mixtures: zero expert E's whole down projection in layer L instead of the super weights (with "
                   "--only, besides those); the router still picks it (repeatable; see docs/ablate.md).")
@click.option("--copy", is_flag=True, help="Copy unchanged files byte for byte instead of hard-linking them.")
@click.option("--in-place", is_flag=True, help="Patch MODEL itself (atomically, with a journal for --restore).")
@click.option("--restore", is_flag=True, help="Undo an --in-place ablation of MODEL from its journal.")
@output_options(json_help="Print what changed as JSON on stdout.", progress_help=None,
                force_help="Replace OUTDIR if it already exists (only an earlier ablate -o output).")
def ablate(model, catalog, output, scale, only, drop_experts, copy, in_place, restore, as_json, force, download):
    """Write a copy of MODEL with the catalog's super weights scaled (0 = removed); only their bytes differ.

    MODEL: a checkpoint directory or .safetensors file, or a Hugging Face id org/name[@revision] (copied
    with -o only: --in-place would change the files the Hugging Face cache shares).
    """
    from swtool.jsonfile import strict_json

    from swtool import ablate as ab
    from swtool.catalog import read_catalog
    from swtool.coordinate import Coordinate
    from swtool.checkpoint import open_checkpoint
    from swtool.checkpoint.hub import hub_id_of_path
    from swtool.errors import SwtoolError
    from swtool.table import plural

    if restore and (catalog or output or in_place or only or drop_experts):
        raise click.UsageError("--restore takes only MODEL (the journal says what to undo)")
    if not restore and not catalog:
        raise click.UsageError("--catalog is required (or --restore)")
    if not restore and bool(output) == in_place:
        raise click.UsageError("give exactly one of -o OUTDIR and --in-place")
    no_stdout_directory("-o", output)
    local = resolve_model(model, download)
    if (in_place or restore) and hub_id_of_path(local):
        raise SwtoolError(f"{model}: is in the Hugging Face cache, whose files are shared; "
                          f"{'--in-place' if in_place else '--restore'} would change them (write a copy with -o OUTDIR)")
    if restore:
        journal = ab.restore_in_place(local)
        experts_restored = len(journal.get("experts_zeroed", ()))
        click.echo(strict_json(ab.describe_restore(model, journal)) if as_json else
                   f"{model}: restored {plural(len(journal['changes']), 'element')}"
                   + (f" and {plural(experts_restored, 'expert')}" if experts_restored else "")
                   + f" from {ab.JOURNAL_NAME}")
        return
    from swtool.experts import parse_expert

    cat = read_catalog(catalog)
    experts = [parse_expert(text) for text in drop_experts]
    # --drop-expert alone zeroes experts, not the super weights; --only names super weights to zero besides
    chosen = ab.select(cat["super_weights"], [Coordinate.parse(o, "--only") for o in only]) if (
        only or not experts) else []
    checkpoint = open_checkpoint(local)
    try:
        patches = ab.plan_patches(checkpoint, chosen, scale)
    except ab.CatalogMismatch as e:
        raise SwtoolError(f"{catalog}: {e}") from None
    expert_patches = []
    if experts:
        from swtool.catalog import mismatch
        from swtool.model import load_model

        loaded = load_model(local)
        problem = mismatch(cat, loaded)
        if problem:
            raise SwtoolError(f"{catalog}: {problem}")
        expert_patches = ab.plan_expert_patches(loaded, experts)
    done = None
    if in_place:
        ab.ablate_in_place(checkpoint, patches, scale, catalog, expert_patches)
        where = f"{model} patched in place; undo with: swtool ablate {model} --restore"
    else:
        done = ab.ablated_copy(checkpoint, cat, patches, scale, output, copy, force, expert_patches)
        where = (f"wrote {output}: {plural(len(done['patched']), 'file')} patched, {len(done['linked'])} hard-linked, "
                 f"{len(done['copied'])} copied; what changed: {output}/{ab.CATALOG_NAME}")
    if as_json:
        click.echo(strict_json(ab.describe_ablation(model, catalog, scale, patches, output, done, expert_patches)))
        return
    if patches:
        click.echo(ab.format_patches(patches))
    if expert_patches:
        click.echo(ab.format_expert_patches(expert_patches))
    click.echo(where)


@main.command("audit")
@model_argument
@click.option("--catalog", type=click.Path(dir_okay=False), help="The super weights to check: a scan catalog.")
@click.option("--known", is_flag=True, help="Check the published super weights of the model (matched by id or config).")
@click.option("--known-id", metavar="ID", help="Check the published super weights of this model (see: swtool catalog known).")
@click.option("--reference", metavar="REF_MODEL",
              help="Compare with another checkpoint of the same model (e.g. the base of a fine-tune).")
@click.option("--tolerance", default="5%", show_default=True, metavar="FRACTION|PERCENT%",
              help="Largest relative change that still counts as intact: a fraction below 1 (0.05) or a percent "
                   "(5%); a bare number of 1 or more is refused, as it would allow a change of 100% or more.")
@click.option("--prompt", default=None, help=PROMPT_HELP + " Used when a scan is needed.")
@threads_option(help_text="Compute a scan, when one is needed, on N threads (default: every core).")
@output_options(json_help="Print the audit as JSON on stdout.", force_help=None,
                progress_help="No progress bar on stderr (when a scan runs).")
def audit_command(model, catalog, known, known_id, reference, tolerance, prompt, as_json, download, no_progress):
    """Check that MODEL kept its super weights, reading only their bytes.

    Exit code 0: all intact within the tolerance; 1: any missing, damaged, ablated or unprotected,
    or a broken model; 2: bad input (another model's catalog included); 3: no verdict, nothing to
    compare with. Without an option the reference is, first that applies: a GGUF's swtool.* metadata,
    the known table (swtool catalog known), a catalog of this model beside it; else a scan of the
    model itself, whose findings are unverified.

    MODEL and REF_MODEL: a checkpoint directory, a .safetensors or .gguf file, or a Hugging Face id
    org/name[@revision] (--download fetches either).
    """
    from swtool.jsonfile import strict_json

    from swtool.audit import audit as run_audit, format_audit, parse_tolerance
    from swtool.errors import SwtoolError

    if catalog and (known or known_id):
        raise SwtoolError("give --catalog or --known/--known-id, not both")
    tolerance = parse_tolerance(tolerance)
    for spec in (model, reference) if reference else (model,):
        resolve_model(spec, download)
    report = run_audit(model, catalog=catalog, known=known, known_id=known_id, reference=reference,
                       tolerance=tolerance, prompt=prompt, progress=not no_progress)
    if as_json:
        click.echo(strict_json(report.to_json()))
    else:
        click.echo(format_audit(report))
    sys.exit(report.exit_code)


@main.command("inspect")
@model_argument
@output_options(json_help="Print the description as JSON on stdout.", progress_help=None, force_help=None)
def inspect_command(model, as_json, download):
    """Architecture, tensors, dtypes, sizes and files of MODEL, and what is known of its super weights.

    MODEL: a checkpoint directory, a .safetensors or .gguf file, or a Hugging Face id org/name[@revision].
    """
    from swtool.jsonfile import strict_json

    from swtool.describe import describe_model, format_description

    resolve_model(model, download)
    info = describe_model(model)
    click.echo(strict_json(info) if as_json else format_description(info))


def gguf_options(command):
    """The options `export` and `quantize` share (applied bottom-up, so listed in reverse)."""
    command = output_options(json_help="Print what was written (or planned, with --dry-run) as JSON on stdout "
                                       "instead of tables.")(command)
    options = [
        click.option("--dry-run", is_flag=True,
                     help="Print every tensor's planned type, size and reason, and the notes; write nothing."),
        click.option("--pure", is_flag=True,
                     help="Every weight in --type: no mix rule and no output-tensor rule (as llama-quantize --pure)."),
        click.option("--leave-output-tensor", is_flag=True,
                     help="Keep output.weight in the type it is stored in (as llama-quantize)."),
        click.option("--token-embedding-type", metavar="TYPE",
                     help="Type of token_embd.weight (as llama-quantize); overrides the rules."),
        click.option("--output-tensor-type", metavar="TYPE",
                     help="Type of output.weight only (as llama-quantize; a --tensor-type 'output\\.weight' also "
                          "matches every attn_output.weight)."),
        click.option("--imatrix", type=click.Path(dir_okay=False), metavar="FILE",
                     help="Quantize with this llama.cpp importance matrix (GGUF or .dat), as llama-quantize --imatrix."),
        click.option("--importance", metavar="SOURCE",
                     help="Where the quantizers' per-column importance comes from: scan (default: the scan's prompt, "
                          "collected in its pass; with --catalog or a file's own record, their prompts in one more "
                          "pass; with --no-scan, none), text:FILE, random[:N] (N random tokens, default 2048), "
                          "self[:N] (N tokens the model samples itself, default 512), or none (llama-quantize without "
                          "--imatrix)."),
        click.option("--no-scan", is_flag=True,
                     help="Without --catalog (and, for a GGUF, without its own swtool.* record), do not scan the "
                          "model for its super weights: nothing is recorded or protected."),
        click.option("--allow-requantize", is_flag=True,
                     help="GGUF input: decode tensors that are already quantized and quantize them again (as "
                          "llama-quantize); the result is no better than the source's quantization."),
        click.option("--sw-handling", type=click.Choice(["keep", "isolate", "none"]), default="keep",
                     show_default=True,
                     help="keep: tensors holding a super weight in --keep-type; isolate: same type as the rest, "
                          "MLP channels reordered so each super weight has a block of near-zero neighbours; "
                          "none: plain quantization (the super weights are still recorded)."),
        click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
                     help="Type of the tensors whose llama.cpp name REGEX matches (re.search, first match wins; "
                          "repeatable), e.g. 'blk\\.2\\.ffn_down=q8_0'. Overrides --keep-type."),
        click.option("--keep-type", type=click.Choice(["f16", "bf16", "q8_0", "f32"], case_sensitive=False), default="q8_0",
                     show_default=True, help="Type of each tensor that holds a super weight (--sw-handling keep)."),
        click.option("--catalog", type=click.Path(dir_okay=False),
                     help="A scan catalog (swtool scan -o): its super weights are recorded and protected."),
        click.option("--type", "qtype", required=True, metavar="TYPE",
                     help="f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k..q6_k, iq4_nl, iq4_xs, or a "
                          "llama-quantize mix: q3_k_s/m/l, q4_k_s/m, q5_k_s/m (any case). Unlike llama-quantize, where "
                          "Q3_K, Q4_K and Q5_K are aliases of the _M mixes and Q2_K is a mix, q2_k..q5_k here put every "
                          "weight in that one type."),
        click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
                     help="The .gguf file to write (- for stdout; the report then goes to stderr)."),
    ]
    for option in [*options, threads_option()]:
        command = option(command)
    return command


def export_options(opts):
    """The ExportOptions of export's and quantize's command line (gguf_options)."""
    from swtool.gguf_export import ExportOptions

    return ExportOptions(
        opts["qtype"], keep_type=opts["keep_type"].lower(), tensor_types=tuple(opts["tensor_types"]),
        handling=opts["sw_handling"], catalog=opts["catalog"], progress=not opts["no_progress"],
        allow_requantize=opts["allow_requantize"], scan=not opts["no_scan"],
        importance=opts["importance"], imatrix=opts["imatrix"],
        output_tensor_type=opts["output_tensor_type"], token_embedding_type=opts["token_embedding_type"],
        pure=opts["pure"], leave_output_tensor=opts["leave_output_tensor"], dry_run=opts["dry_run"])


def print_export(report, source, opts, err=False):
    """export's and quantize's summary: the tables, or with --json describe_export."""
    from swtool.gguf_export import describe_export, format_export
    from swtool.jsonfile import strict_json

    text = (strict_json(describe_export(report, source, export_options(opts))) if opts["as_json"]
            else format_export(report))
    click.echo(text, err=err)


def write_gguf_output(opts, source, write):
    """`write(path)` the GGUF file -o names and print its report; for `-o -` the file is written in a
    temporary directory, copied to stdout and removed, and the report goes to stderr."""
    import dataclasses
    import shutil
    import tempfile

    if opts["output"] != STDOUT:
        print_export(write(opts["output"]), source, opts)
        return
    with tempfile.TemporaryDirectory(prefix="swtool-") as work:
        report = write(Path(work) / "stdout.gguf")
        if not opts["dry_run"]:
            with open(report.path, "rb") as written:
                shutil.copyfileobj(written, click.get_binary_stream("stdout"), 1 << 20)
        print_export(dataclasses.replace(report, shown_as=STDOUT), source, opts, err=True)  # (it reads the file's size)


def gguf_inputs(model, opts):
    """What export or quantize reads: the model, the catalog, and the file of --imatrix or --importance text:FILE."""
    from swtool.export_importance import parse_importance

    return model, opts["catalog"], parse_importance(opts["importance"], opts["imatrix"]).path


@main.command("export")
@model_argument
@gguf_options
def export_command(model, download, **opts):
    """Write MODEL (a Hugging Face checkpoint, or a GGUF file to change its type) as a GGUF file for llama.cpp.

    Without --catalog, MODEL is scanned first and the super weights it finds are recorded and protected.
    MODEL: a checkpoint directory, a .safetensors or .gguf file, or a Hugging Face id org/name[@revision].
    """
    prepare_outputs(opts["force"], opts["output"], inputs=gguf_inputs(model, opts))  # before anything is read
    from swtool.gguf_export import export

    resolve_model(model, download)
    write_gguf_output(opts, model, lambda out: export(model, out, export_options(opts)))


@main.command("quantize")
@click.argument("gguf_file", metavar="IN.GGUF", type=click.Path())
@gguf_options
def quantize_command(gguf_file, **opts):
    """Quantize a GGUF file to another type; all its metadata and vocabulary are copied.

    The super weights protected are, first that applies: --catalog's, those the file records
    (swtool.* metadata of a swtool export), or a scan of the file. Tensors already quantized are
    re-quantized only with --allow-requantize.

    IN.GGUF: a .gguf file, a directory holding one, or the Hugging Face id org/name[@revision] of a
    cached repository holding one. There is no --download: swtool downloads safetensors checkpoints
    only (export takes those), never a repository's .gguf files.
    """
    from swtool.checkpoint.hub import parse_hub_id
    from swtool.checkpoint.source import gguf_file_of
    from swtool.errors import SwtoolError

    repo = (parse_hub_id(gguf_file) or ("org/name",))[0]
    local = resolve_model(gguf_file, False, missing_hint=f"quantize does not download: fetch the .gguf file "
                                                         f"first (hf download {repo} FILE.gguf)")
    source = gguf_file_of(local)
    if source is None and local.is_dir():
        raise SwtoolError(f"{gguf_file}: holds no .gguf file; swtool export writes one from a Hugging Face checkpoint")
    source = source or local  # any other file: read_gguf says what it is instead
    prepare_outputs(opts["force"], opts["output"], inputs=gguf_inputs(source, opts))  # before anything is read
    from swtool.gguf_export import quantize_gguf

    write_gguf_output(opts, gguf_file, lambda out: quantize_gguf(source, out, export_options(opts)))


@main.command("imatrix")
@model_argument
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The importance matrix file to write (- for stdout; the summary then goes to stderr).")
@click.option("--format", "fmt", type=click.Choice(["gguf", "dat"]), default=None,
              help="llama.cpp's GGUF imatrix or its legacy .dat (default: dat for a .dat suffix, else gguf).")
@click.option("--text", "text_path", type=click.Path(),
              help="UTF-8 text file, cut into chunks of --ctx tokens as llama-imatrix cuts it (whole chunks only, "
                   "each starting with BOS when the model adds one).")
@click.option("--random-tokens", type=click.IntRange(min=1), metavar="N",
              help="N token ids drawn uniformly over the vocabulary (--seed), in sequences of --ctx.")
@click.option("--self-generated", type=click.IntRange(min=1), metavar="N",
              help="N tokens the model samples itself (temperature 1, --seed) from BOS, in sequences of --ctx; "
                   "costs one pass per position (no KV cache).")
@click.option("--prompt", "prompts", multiple=True, help="A prompt, each its own sequence (repeatable).")
@click.option("--in-file", "in_files", multiple=True, type=click.Path(dir_okay=False),
              help="An imatrix file (GGUF or .dat) to add to what is computed, as llama-imatrix --in-file "
                   "(repeatable).")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(min=2),
              help="Tokens per chunk (imatrix.chunk_size).")
@click.option("--chunks", type=click.IntRange(min=1), metavar="N", help="Use only the first N chunks of --text.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of --random-tokens and --self-generated.")
@click.option("--top", default=5, show_default=True, type=click.IntRange(min=1),
              help="Columns per tensor in the --json summary (largest mean x² first).")
@click.option("--batch-tokens", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Tokens of one pass (one read of the weights); more take several passes.")
@threads_option()
@output_options(json_help="Print a summary as JSON on stdout: per tensor, counts, energy and top columns.")
def imatrix_command(model, output, fmt, text_path, random_tokens, self_generated, prompts, in_files, ctx, chunks, seed,
                    top, batch_tokens, as_json, no_progress, force, download):
    """Compute an importance matrix of MODEL as llama.cpp's llama-imatrix does, for llama-quantize --imatrix.

    Per linear of every block, the sum of x² per input column over the tokens (a mixture's experts over
    the tokens routed to each), collected in one streaming pass over the weights per batch of sequences.
    MODEL: a checkpoint directory, a .safetensors or .gguf file, or a Hugging Face id org/name[@revision].
    """
    import time

    from swtool import imatrix as im
    from swtool.jsonfile import strict_json

    sources = [name for name, given in (("--text", text_path), ("--random-tokens", random_tokens),
                                        ("--self-generated", self_generated), ("--prompt", prompts)) if given]
    if len(sources) != 1:
        raise click.UsageError(f"give exactly one of --text, --random-tokens, --self-generated and --prompt"
                               f"{' (got ' + ', '.join(sources) + ')' if sources else ''}")
    if chunks is not None and not text_path:
        raise click.UsageError("--chunks counts chunks of --text")
    prepare_outputs(force, output, inputs=(model, text_path, *in_files))
    fmt = im.format_for(output, fmt)
    earlier = [im.read_imatrix(path) for path in in_files]  # bad files fail before the model is read
    from swtool.model import load_model
    from swtool.tokenizer import encode, load_tokenizer

    resolve_model(model, download)
    loaded = load_model(model)
    progress = not no_progress
    if text_path:
        from swtool.evaluate import text_token_ids

        tokenizer = load_tokenizer(loaded.directory)
        ids = text_token_ids(loaded.directory, text_path, chunks * ctx if chunks else None)
        sequences = im.text_sequences(ids, ctx, im.bos_id(loaded.directory, tokenizer), chunks)
        kind, dataset = "text", str(text_path)
    elif prompts:
        tokenizer = load_tokenizer(loaded.directory)
        sequences = [encode(loaded.directory, prompt, tokenizer) for prompt in prompts]
        kind, dataset = "prompts", f"swtool:prompts:{len(prompts)}"
    else:
        tokenizer = load_tokenizer(loaded.directory)
        bos = im.bos_id(loaded.directory, tokenizer)
        if random_tokens:
            sequences = im.random_sequences(random_tokens, ctx, loaded.arch.vocab_size, bos, seed)
            kind, dataset = "random-tokens", f"swtool:random-tokens:{random_tokens}:seed={seed}"
        else:
            sequences = im.self_generated_sequences(loaded, self_generated, ctx, bos, seed, progress)
            kind, dataset = "self-generated", f"swtool:self-generated:{self_generated}:seed={seed}"
    start = time.perf_counter()
    importance = im.collect(loaded, sequences, [dataset], ctx, progress=progress, batch_tokens=batch_tokens)
    seconds = time.perf_counter() - start
    if earlier:
        importance = im.merge([*earlier, importance], ctx)
    data = im.gguf_bytes(importance) if fmt == "gguf" else im.dat_bytes(importance)
    if output == STDOUT:
        click.get_binary_stream("stdout").write(data)
        click.get_binary_stream("stdout").flush()
    else:
        im.write_bytes(output, data)
    summary = im.describe(loaded, importance, output, fmt, kind, dataset, sequences, seconds, top)
    text = strict_json(summary) if as_json else im.format_summary(summary)
    click.echo(text, err=output == STDOUT)


@main.command("sweep")
@model_argument
@click.option("--text", "text_path", required=True, type=click.Path(), help="UTF-8 text file to score.")
@click.option("--types", default="q2_k,q3_k,q4_0,q4_k,q5_k,q6_k,q8_0", show_default=True, metavar="T,T,..",
              help="Export types (as swtool export --type), comma-separated.")
@click.option("--handlings", default="none,keep:q8_0,control:q8_0", show_default=True, metavar="H,H,..",
              help="none, keep[:TYPE] (--sw-handling keep --keep-type TYPE), isolate, control[:TYPE] (the same "
                   "bytes spent on ffn_down tensors without a super weight); TYPE: f16, bf16, q8_0, f32. Each "
                   "may add +importance:SOURCE, or importance:SOURCE alone: quantized with the importance of the "
                   "scan's prompt (scan), --importance-text (text), 2048 random tokens (random, or random:N) or 512 "
                   "tokens the model samples itself (self, or self:N); without it, "
                   "none (llama-quantize without --imatrix).")
@click.option("--importance-text", type=click.Path(dir_okay=False), metavar="FILE",
              help="The text of importance:text (not --text, which the files are scored on).")
@click.option("--catalog", type=click.Path(dir_okay=False),
              help="A scan catalog (swtool scan -o); without it, MODEL is scanned first with scan's defaults.")
@click.option("--ctx", default=512, show_default=True, type=int,
              help="Tokens per window; each window is an independent sequence and every prediction is scored.")
@click.option("--windows", "n_windows", type=click.IntRange(min=1),
              help="Score the first N windows of ctx tokens (default: every full window of the text).")
@click.option("--out-dir", type=click.Path(file_okay=False),
              help="Keep the GGUF files (and a scanned catalog) here; by default they go to a temporary "
                   "directory that is removed.")
@threads_option(expose=True, help_text="swtool's and llama.cpp's threads (default: swtool on every core, llama.cpp "
                                       "on one, which keeps runs on a busy machine comparable).")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Also write the result as JSON to this file (- for stdout, instead of the table).")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Write perplexity against bits per weight, a line per handling, as .png/.svg/.pdf (needs matplotlib).")
@output_options(json_help="Print the result as JSON on stdout instead of a table.",
                progress_help="No progress lines or bars on stderr.",
                force_help="Replace -o, --plot and files of the same names in --out-dir.")
def sweep_command(model, text_path, types, handlings, importance_text, catalog, ctx, n_windows, out_dir, threads,
                  output, plot, as_json, no_progress, force, download):
    """Export MODEL at several GGUF types, with and without super-weight handling; perplexity of each in llama.cpp.

    Needs llama-cpp-python: pip install 'swtool[llama]'.
    MODEL: a checkpoint directory or .safetensors file, or a Hugging Face id org/name[@revision].
    """
    from swtool.jsonfile import strict_json
    from swtool.llama_score import require_llama

    require_llama("swtool sweep")  # before anything is read or exported
    from swtool.sweep import format_sweep, parse_handlings, parse_types, run_sweep

    no_stdout_directory("--out-dir", out_dir)
    type_names, handling_list = parse_types(types), parse_handlings(handlings)
    prepare_outputs(force, output, plot=plot, inputs=(model, text_path, catalog, importance_text))  # before the exports
    from swtool.evaluate import read_text

    text = read_text(text_path)
    resolve_model(model, download)

    def log(line):
        if not no_progress:
            click.echo(line, err=True)

    result = run_sweep(model, text_path, text, type_names, handling_list, catalog, ctx, n_windows, out_dir,
                       threads or 1, force, not no_progress, log, importance_text)
    if output and output != STDOUT:
        from swtool.atomic import write_text_atomic

        write_text_atomic(output, strict_json(result.to_json()) + "\n")
    if plot:
        from swtool.plot import plot_sweep

        plot_sweep(plot, result, f"{model}: {text_path}, {result.windows} x {result.ctx} tokens")
    if output == STDOUT:  # the file's bytes alone on stdout; the table on stderr
        click.echo(strict_json(result.to_json()))
        click.echo(format_sweep(result), err=True)
        return
    click.echo(strict_json(result.to_json()) if as_json else format_sweep(result))
    if plot and not as_json:
        click.echo(f"plot written to {plot}")


@main.group("catalog")
def catalog_group():
    """Super-weight catalogs."""


@catalog_group.command("known")
@output_options(json_help="Print the data file (coordinates, sources, notes) as JSON.", progress_help=None,
                force_help=None)
def catalog_known(as_json):
    """The super weights published for public models, with their sources."""
    from swtool.jsonfile import strict_json

    from swtool.known import format_known, load

    data, models = load()
    click.echo(strict_json(data) if as_json else format_known(data, models))
