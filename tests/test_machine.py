"""The machine label that step times and benchmarks are recorded with, and its round trip through a run's
machines.jsonl (written by ``spear experiment``, read by ``spear compare``)."""

from __future__ import annotations

import os
from pathlib import Path

from spear_engine.machine import cpu_model, machine_label, machine_spans, record_machine

XEON = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: something else
"""


def test_cpu_model_names_family_and_model_of_the_first_processor() -> None:
    assert cpu_model(XEON) == "Intel(R) Xeon(R) Platinum 8480+ (cpu family 6, model 143)"


def test_cpu_model_without_family_numbers_is_the_bare_name() -> None:
    assert cpu_model("processor: 0\nmodel name: Neoverse-V2\n") == "Neoverse-V2"
    assert cpu_model("") != ""  # platform.processor() or "unknown CPU"


def test_machine_label_counts_the_cpus_this_process_may_use() -> None:
    label = machine_label()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert label.startswith(cpu_model()) and f", {cpus} CPUs" in label


def test_each_stage_of_a_run_appends_its_machine(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "spear" / "seed0"
    record_machine(run, 0)
    record_machine(run, 7)  # resumed after step 7
    assert machine_spans(run) == [(0, machine_label()), (7, machine_label())]
    assert machine_spans(tmp_path) == []  # no machines file: nothing recorded
