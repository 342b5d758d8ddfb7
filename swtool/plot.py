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
