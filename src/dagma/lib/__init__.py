"""Pure logic shared by assets, notebooks, the CLI and the app. Nothing here imports Dagster."""
