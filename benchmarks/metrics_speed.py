"""Why hfplug.training.metrics computes top-k itself and leaves the rest to scikit-learn, measured side by side.

    python benchmarks/metrics_speed.py            # IPC-sized: 20,000 rows x 637 classes

Prints seconds per call (best of 3), hfplug's function against scikit-learn's, and their ratio:
the classification scores (hfplug calls scikit-learn there, after its input checks) and the
top-k accuracies (hfplug's own rank count).
"""

import argparse
import time

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, top_k_accuracy_score

from hfplug.training.metrics import classification_scores, top_k_accuracies


def best_of(fn, repeats=3):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=637)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((args.rows, args.classes)).astype(np.float32)
    refs = rng.integers(0, args.classes, args.rows)
    preds = logits.argmax(-1)
    labels = np.arange(args.classes)
    rows = [
        (
            "P/R/F1 (both sklearn)",
            lambda: classification_scores(preds, refs),
            lambda: (
                accuracy_score(refs, preds),
                precision_recall_fscore_support(refs, preds, average="macro", zero_division=0),
            ),
        ),
        (
            "top-1 and top-5 accuracy",
            lambda: top_k_accuracies(logits, refs, k=(1, 5)),
            lambda: [top_k_accuracy_score(refs, logits, k=k, labels=labels) for k in (1, 5)],
        ),
    ]
    print(f"{args.rows} rows x {args.classes} classes, seconds per call (best of 3)")
    for name, ours, theirs in rows:
        a, b = best_of(ours), best_of(theirs)
        print(f"{name:26s} hfplug.training.metrics {a:.4f}  scikit-learn {b:.4f}  ratio {b / a:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
