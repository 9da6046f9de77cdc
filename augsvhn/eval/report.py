"""Turn per-slice predictions of every (arm, seed) into report.json, report.md and plots."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from augsvhn.eval import stats  # noqa: E402
from augsvhn.eval.classifier import ARMS, NUM_CLASSES  # noqa: E402
from augsvhn.eval.slices import TestSlice  # noqa: E402
from augsvhn.fsutil import atomic_path, atomic_write_json  # noqa: E402

ALPHA = 0.05  # significance level of the sentences in report.md
BOOTSTRAP_RESAMPLES = 10_000
# Pairs of arms compared digit by digit: (key in report.json, arm A, arm B); the difference is A - B.
COMPARISONS = (("delta", "augmented", "baseline"), ("delta_vs_classic", "augmented", "classic_augmentation"))

Predictions = dict[str, dict[int, dict[str, np.ndarray]]]  # arm -> seed -> slice name -> predicted digits


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _correct(predictions: Predictions, arm: str, test_slice: TestSlice) -> np.ndarray:
    """Boolean (seeds, digits): whether each seed's model of `arm` got each digit of the slice right."""
    seeds = sorted(predictions[arm])
    return np.stack([predictions[arm][seed][test_slice.name] == test_slice.labels for seed in seeds])


def _comparison(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    interval = stats.paired_bootstrap(correct_a, correct_b, n_resamples=BOOTSTRAP_RESAMPLES)
    pooled = stats.mcnemar(correct_a, correct_b)
    per_seed = [stats.mcnemar(a, b).p_value for a, b in zip(correct_a, correct_b)]
    return {
        "mean": interval.mean,
        "ci95": interval.as_list(),
        "mcnemar_p": pooled.p_value,
        "mcnemar_method": pooled.method,
        "only_a_correct": pooled.b,
        "only_b_correct": pooled.c,
        "mcnemar_p_per_seed": per_seed,
        "significant": bool((interval.low > 0 or interval.high < 0) and pooled.p_value < ALPHA),
    }


def _hardness(predictions: Predictions, test_slice: TestSlice, all_slice: TestSlice) -> dict:
    """Compare the baseline's accuracy on a slice with its accuracy on all clean test digits."""
    clean = _correct(predictions, "baseline", all_slice)
    if test_slice.n == all_slice.n and np.array_equal(test_slice.indices, all_slice.indices):
        # A corrupted copy of every digit: paired with the clean digits.
        interval = stats.paired_bootstrap(_correct(predictions, "baseline", test_slice), clean, BOOTSTRAP_RESAMPLES)
        method = "paired bootstrap, corrupted minus clean digits"
    else:
        subset = np.zeros(all_slice.n, dtype=bool)
        subset[test_slice.indices] = True
        interval = stats.bootstrap_subset_difference(clean, subset, BOOTSTRAP_RESAMPLES)
        method = "bootstrap over test digits, slice minus all digits"
    return {
        "baseline_accuracy_all": float(clean.mean()),
        "difference": interval.mean,
        "ci95": interval.as_list(),
        "method": method,
        "harder": bool(interval.high < 0),
    }


def build_report(settings: dict, test_slices: list[TestSlice], predictions: Predictions) -> dict:
    """Compute accuracies with t-intervals over seeds, paired comparisons and slice hardness for every slice."""
    all_slice = next(s for s in test_slices if s.name == "all")
    slices_report = {}
    for test_slice in test_slices:
        entry: dict = {"n": test_slice.n, "description": test_slice.description, "definition": test_slice.settings}
        correct = {arm: _correct(predictions, arm, test_slice) for arm in ARMS}
        for arm in ARMS:
            per_seed = correct[arm].mean(axis=1)
            interval = stats.t_interval(per_seed)
            entry[arm] = {
                "accuracy": interval.mean,
                "ci95": [_finite(interval.low), _finite(interval.high)],
                "per_seed": [float(value) for value in per_seed],
            }
        for key, arm_a, arm_b in COMPARISONS:
            entry[key] = _comparison(correct[arm_a], correct[arm_b])
        if test_slice.name != "all":
            entry["baseline_vs_all"] = _hardness(predictions, test_slice, all_slice)
        slices_report[test_slice.name] = entry
    return {"settings": settings, "arms": list(ARMS), "alpha": ALPHA, "slices": slices_report}


# ---- per-class accuracy and confusion -----------------------------------------------------------


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Counts (10, 10): row = true digit, column = predicted digit."""
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def per_class_report(all_slice: TestSlice, predictions: Predictions) -> dict:
    """Per-class accuracy and confusion matrix of each arm on all clean test digits, summed over seeds."""
    result = {}
    for arm in ARMS:
        matrix = sum(confusion_matrix(all_slice.labels, predictions[arm][seed]["all"]) for seed in predictions[arm])
        totals = matrix.sum(axis=1)
        accuracy = np.diag(matrix) / np.maximum(totals, 1)
        result[arm] = {"per_class_accuracy": accuracy.tolist(), "confusion": matrix.tolist()}
    return result


def save_confusion_plot(matrix: np.ndarray, path: Path, title: str) -> None:
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    for row in range(NUM_CLASSES):
        for col in range(NUM_CLASSES):
            colour = "white" if normalised[row, col] > 0.5 else "black"
            ax.text(col, row, f"{normalised[row, col]:.2f}", ha="center", va="center", fontsize=6, color=colour)
    ax.set_xticks(range(NUM_CLASSES))
    ax.set_yticks(range(NUM_CLASSES))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save_figure(fig, path)


def save_accuracy_plot(report_data: dict, path: Path) -> None:
    """Bar chart of each arm's accuracy per slice with its 95% t-interval over seeds."""
    names = list(report_data["slices"])
    width = 0.8 / len(ARMS)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names)), 3.8))
    for number, arm in enumerate(ARMS):
        means = np.array([report_data["slices"][name][arm]["accuracy"] for name in names])
        lows = np.array([report_data["slices"][name][arm]["ci95"][0] or np.nan for name in names])
        highs = np.array([report_data["slices"][name][arm]["ci95"][1] or np.nan for name in names])
        errors = np.nan_to_num(np.stack([means - lows, highs - means]), nan=0.0)  # (2, slices)
        positions = np.arange(len(names)) + (number - (len(ARMS) - 1) / 2) * width
        ax.bar(positions, means, width, yerr=errors, capsize=2, label=arm)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=20, fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("accuracy per slice (error bars: 95% t-interval over seeds)", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=110, format="png")
    plt.close(fig)


# ---- markdown -----------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _sentence(name: str, comparison: dict, versus: str) -> str:
    low, high = comparison["ci95"]
    verdict = "significant" if comparison["significant"] else "not significant"
    direction = "gain" if comparison["mean"] >= 0 else "loss"
    return (
        f"On `{name}`, augmented minus {versus} is {100 * comparison['mean']:+.1f} points "
        f"(95% bootstrap interval {100 * low:+.1f} to {100 * high:+.1f}, McNemar p = {comparison['mcnemar_p']:.3g}): "
        f"the {direction} is {verdict} at the {ALPHA:.0%} level."
    )


def _hardness_sentence(name: str, hardness: dict) -> str:
    low, high = hardness["ci95"]
    if hardness["harder"]:
        verdict = "harder than all digits"
    elif low > 0:
        verdict = "easier than all digits"
    else:
        verdict = "no harder than all digits (the interval includes 0)"
    return (
        f"`{name}` for the baseline: {100 * hardness['difference']:+.1f} points vs all digits "
        f"(95% interval {100 * low:+.1f} to {100 * high:+.1f}; {hardness['method']}), so this slice is {verdict}."
    )


def render_markdown(report_data: dict) -> str:
    settings = report_data["settings"]
    lines = [
        "# Classifier evaluation",
        "",
        f"Model `{settings['model']}` trained from scratch for {settings['steps']} steps of batch "
        f"{settings['batch_size']} per arm and seed, {settings['seeds']} seeds; synthetic share of each "
        f"`augmented` batch {settings['synthetic_fraction']:g}. Stem: {settings['stem_adaptation']}. "
        f"Shards manifest SHA-256 `{settings['shards_manifest_sha256']}`.",
        "",
        "Accuracy in % (mean over seeds, 95% t-interval in brackets); delta = augmented minus baseline, with its "
        "paired bootstrap interval over test digits and seeds.",
        "",
        "| slice | n | baseline | classic_augmentation | augmented | synthetic_only | delta | delta 95% | McNemar p |"
        " vs classic | vs classic 95% |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report_data["slices"].items():
        cells = [f"`{name}`", str(entry["n"])]
        for arm in ARMS:
            low, high = entry[arm]["ci95"]
            interval = "" if low is None else f" [{_percent(low)}, {_percent(high)}]"
            cells.append(f"{_percent(entry[arm]['accuracy'])}{interval}")
        for key in ("delta", "delta_vs_classic"):
            comparison = entry[key]
            cells.append(f"{100 * comparison['mean']:+.1f}")
            cells.append(f"[{100 * comparison['ci95'][0]:+.1f}, {100 * comparison['ci95'][1]:+.1f}]")
            if key == "delta":
                cells.append(f"{comparison['mcnemar_p']:.3g}")
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Is the gain significant?", ""]
    for name, entry in report_data["slices"].items():
        versus_baseline = _sentence(name, entry["delta"], "baseline")
        versus_classic = _sentence(name, entry["delta_vs_classic"], "classic_augmentation")
        lines.append(f"- {versus_baseline} {versus_classic}")
    lines += ["", "## Slices", ""]
    for name, entry in report_data["slices"].items():
        text = f"- `{name}` ({entry['n']} digits): {entry['description']}."
        if "baseline_vs_all" in entry:
            text += " " + _hardness_sentence(name, entry["baseline_vs_all"])
        lines.append(text)
    lines += [
        "",
        f"Significant means both tests agree at the {ALPHA:.0%} level: the paired bootstrap interval excludes 0 and "
        "McNemar's test (pooled over seeds; exact binomial below 25 discordant digits) gives p < "
        f"{ALPHA:g}. Plots: `accuracy.png`, `confusion_<arm>.png`, `slices/<slice>.png`.",
        "",
    ]
    return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def write_report(
    out_dir: str | Path, report_data: dict, test_slices: list[TestSlice], predictions: Predictions
) -> None:
    """Write report.json, report.md, accuracy.png, per_class.json and confusion_<arm>.png to `out_dir`."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "report.json", _json_safe(report_data))
    with atomic_path(out_dir / "report.md") as temporary:
        temporary.write_text(render_markdown(report_data), encoding="utf-8")
    save_accuracy_plot(report_data, out_dir / "accuracy.png")
    all_slice = next(s for s in test_slices if s.name == "all")
    per_class = per_class_report(all_slice, predictions)
    atomic_write_json(out_dir / "per_class.json", per_class)
    for arm, entry in per_class.items():
        save_confusion_plot(np.array(entry["confusion"]), out_dir / f"confusion_{arm}.png", f"{arm}: all test digits")
