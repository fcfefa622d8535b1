"""Non-LLM floors for LawBench on the SIA paper's split: majority class, TF-IDF + logistic
regression, and a stronger linear model (TF-IDF word-piece and character n-grams + linear SVM).

Trained on the task's train + dev splits (the paper's 5,332 training cases), scored on
its 913 private test cases with the task's own metrics (top-1 accuracy, mean set-F1).

    python experiments/lawbench/baselines.py
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import numpy as np
from scipy.sparse import hstack
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

TASK = Path(__file__).resolve().parents[2] / "tasks" / "lawbench"
sys.path.insert(0, str(TASK))
from charges import set_f1, top1_correct  # noqa: E402

PAPER = {"initial (paper)": 0.135, "prior best (paper)": 0.450, "SIA-H (paper)": 0.500, "SIA-W+H (paper)": 0.701}


def read(split_file: str) -> list[dict]:
    return [json.loads(line) for line in (TASK / split_file).read_text(encoding="utf-8").splitlines() if line]


def scores(predictions: list[list[str]], items: list[dict]) -> dict:
    return {"top1": float(np.mean([top1_correct(p, i["labels"]) for p, i in zip(predictions, items)])),
            "set_f1": float(np.mean([set_f1(p, i["labels"]) for p, i in zip(predictions, items)]))}


def majority(train, test):
    label = collections.Counter(i["labels"][0] for i in train).most_common(1)[0][0]
    return [[label] for _ in test]


def tfidf_logreg(train, test, seed=0):
    vectoriser = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True)
    features = vectoriser.fit_transform([i["facts"] for i in train])
    model = LogisticRegression(C=10.0, max_iter=2000, random_state=seed)
    model.fit(features, [i["labels"][0] for i in train])
    return [[label] for label in model.predict(vectoriser.transform([i["facts"] for i in test]))]


def char_ngram_svm(train, test):
    """Character 1-4 grams and 2-5 grams of the text without digits, linear SVM (one-vs-rest)."""
    strip = lambda text: "".join(ch for ch in text if not ch.isdigit())  # noqa: E731
    vectorisers = [TfidfVectorizer(analyzer="char", ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=200_000),
                   TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), min_df=3, sublinear_tf=True,
                                   max_features=300_000)]
    train_text, test_text = [strip(i["facts"]) for i in train], [strip(i["facts"]) for i in test]
    features = hstack([v.fit_transform(train_text) for v in vectorisers]).tocsr()
    model = LinearSVC(C=0.5)
    model.fit(features, [i["labels"][0] for i in train])
    test_features = hstack([v.transform(test_text) for v in vectorisers]).tocsr()
    return [[label] for label in model.predict(test_features)]


def main():
    train, test = read("data/public/train.jsonl") + read("data/public/dev.jsonl"), read("data/private/test.jsonl")
    rows = {"majority class": scores(majority(train, test), test),
            "TF-IDF char 1-3 + logistic regression": scores(tfidf_logreg(train, test), test),
            "TF-IDF char 1-2 + char_wb 3-5 + linear SVM": scores(char_ngram_svm(train, test), test)}
    print(f"train+dev {len(train)} cases, test {len(test)} cases")
    print("| model | top-1 accuracy | set-F1 |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['top1']:.3f} | {r['set_f1']:.3f} |")
    for name, top1 in PAPER.items():
        print(f"| {name} | {top1:.3f} | |")
    out = Path("experiments/out/lawbench_baselines.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
