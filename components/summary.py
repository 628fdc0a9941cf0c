"""The summary of one pipeline run: what was trained, how it scores, what the registry decided."""

from __future__ import annotations

import json

from components.probe import FractionResult
from components.report import summary_table


def pipeline_summary(run_name: str, mlflow_run_id: str, retrieval: str, probes: list[str], registration: str,
                     report: str) -> str:
    """Markdown from the steps' JSON results: the table `lcr demo` prints, then the decision."""
    fractions = [FractionResult(p["pooling"], p["fraction"], p["train_images"], [], p["accuracy"])
                 for found in probes for p in json.loads(found)]
    fractions.sort(key=lambda r: -r.fraction)
    decided = json.loads(registration)
    return "\n".join([
        f"## {run_name}",
        "",
        "Retrieval over the test split and linear probes on train subsets, in %:",
        "",
        "```",
        summary_table(json.loads(retrieval), fractions),
        "```",
        "",
        f"- registry: {decided['model']} version {decided['version']}: **{decided['decision']}** "
        f"({decided['reason']})",
        f"- MLflow run: {mlflow_run_id}",
        f"- report: {report}",
    ])
