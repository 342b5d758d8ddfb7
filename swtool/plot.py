"""Per-layer activation profiles as a picture (the paper's Figure 4): matplotlib, an optional extra.

    pip install 'swtool[plot]'
"""

from swtool.atomic import atomic_path
from swtool.errors import SwtoolError

FORMATS = ("png", "svg", "pdf")


def require_matplotlib(path):
    """Fail early, before a long pass, if the plot cannot be written."""
    suffix = str(path).rsplit(".", 1)[-1].lower() if "." in str(path) else ""
    if suffix not in FORMATS:
        raise SwtoolError(f"--plot {path}: name the file .png, .svg or .pdf")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SwtoolError("--plot needs matplotlib, an optional extra: pip install 'swtool[plot]'") from None


def plot_profiles(path, profiles, title, ylabel="max |down_proj output|"):
    """profiles {label: [value per layer]} as lines over the layers, log y-axis; written atomically."""
    require_matplotlib(path)
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.6), dpi=120)
    for (label, values), marker in zip(profiles.items(), "osD^v<>x+*"):
        axes.plot(range(len(values)), values, marker=marker, markersize=3.5, linewidth=1.2, label=label)
    axes.set_yscale("log")
    axes.set_xlabel("layer")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=str(path).rsplit(".", 1)[-1].lower())
    plt.close(figure)


def plot_quantsim(path, result, title):
    """`swtool quantsim --plot`: perplexity per block size, RTN and super-weight-aware, next to the
    unquantized model; with --activations a second panel of the int8 activation settings."""
    require_matplotlib(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [key for key in ("weights", "activations") if key in result]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.4, 3.4), dpi=100, squeeze=False,
                                gridspec_kw={"width_ratios": [2 if p == "weights" else 1 for p in panels]})
    base = result["baseline"]["perplexity"]
    for ax, panel in zip(axes[0], panels):
        if panel == "weights":
            settings = result["weights"]["settings"]
            sizes = list(dict.fromkeys(s["block_size"] for s in settings))
            for method, label, marker in (("rtn", "RTN", "o"), ("aware", f"clip {result['weights']['clip']} + restore SW", "s")):
                values = [s["perplexity"] for s in settings if s["method"] == method]
                ax.plot(range(len(sizes)), values, marker=marker, markersize=4, linewidth=1.2, label=label)
            ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
            ax.set_xlabel("block size (elements)")
            ax.set_title(f"INT{result['weights']['bits']} weights", fontsize=9)
        else:
            settings = result["activations"]["settings"]
            ax.bar(range(len(settings)), [s["perplexity"] for s in settings], color=["C7", "C0", "C1"])
            ax.set_xticks(range(len(settings)), ["none", "int8", "int8 +\nSA kept"], fontsize=8)
            ax.set_title("INT8 activations (weights as stored)", fontsize=9)
        ax.axhline(base, color="gray", linestyle="--", linewidth=1, label=f"unquantized {base:.2f}")
        if panel == "weights":
            ax.set_yscale("log")  # block sizes span orders of magnitude of perplexity
        ax.set_ylabel("perplexity")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=str(path).rsplit(".", 1)[-1].lower())
    plt.close(figure)
