"""Services mode: Postgres, an MLflow server and Dagster's daemon topology as local processes."""
