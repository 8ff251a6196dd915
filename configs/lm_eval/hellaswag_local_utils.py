"""HellaSwag documents -> query / choices / gold, as lm-eval's hellaswag task builds them
(lm_eval 0.4.13 tasks/hellaswag/utils.py), from the published fields or from plain
ctx / endings / label rows."""

import re


def preprocess(text):
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _process_doc(doc):
    if doc.get("ctx_a") is not None and doc.get("ctx_b") is not None:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    else:
        ctx = doc["ctx"]
    label = doc.get("activity_label")
    return {
        "query": preprocess(f"{label}: {ctx}" if label else ctx),
        "choices": [preprocess(e) for e in doc["endings"]],
        "gold": int(doc["label"]),
    }


def process_docs(dataset):
    return dataset.map(_process_doc)
