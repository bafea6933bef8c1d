import dagster as dg

from dagma.lab import load_definitions
from dagma.settings import get_settings

DEMO_ASSETS = {
    "wine_table",
    "doc_corpus",
    "wine_model",
    "wine_clusters",
    "wine_daily_scores",
    "wine_arrivals",
    "wine_arrival_scores",
    "doc_vectors",
    "rag_eval",
    "lab_scorecard",
}


def test_the_whole_graph_loads_with_its_groups_and_lineage():
    defs = load_definitions(get_settings())
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys >= DEMO_ASSETS
    assert graph.get(dg.AssetKey("wine_model")).group_name == "models"
    assert graph.get(dg.AssetKey("doc_vectors")).group_name == "llm"
    assert dg.AssetKey("wine_table") in graph.get(dg.AssetKey("wine_model")).parent_keys
    assert dg.AssetKey("doc_vectors") in graph.get(dg.AssetKey("rag_eval")).parent_keys


def test_notebook_assets_carry_code_versions_and_launchpad_config():
    defs = load_definitions(get_settings())
    node = defs.resolve_assets_def("wine_model")
    assert node.code_versions_by_key[dg.AssetKey("wine_model")]
    fields = node.op.config_schema.config_type.fields
    assert {"seed", "C", "max_iter", "test_size"} <= set(fields)
    assert fields["seed"].default_value == 42


def test_resources_are_wired_once_per_external_system():
    defs = load_definitions(get_settings())
    assert {"mlflow", "qdrant", "llm", "io_manager"} <= set(defs.resources or {})


def test_dg_check_defs_loads_the_project(tmp_path):
    """The same check a developer runs: `dg check defs` from the project root."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dagma.settings import PROJECT_ROOT

    env = {**os.environ, "DAGMA_HOME": str(tmp_path), "VIRTUAL_ENV": sys.prefix}
    env.pop("DAGSTER_HOME", None)
    dg_cli = Path(sys.executable).with_name("dg")
    done = subprocess.run(
        [str(dg_cli), "check", "defs"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "All definitions loaded successfully" in done.stdout + done.stderr
