"""trackhouse.query.http — the MLflow REST API (`/api/2.0/mlflow/`, `/ajax-api/2.0/mlflow/`).

    routes        mlflow_routes(api): the starlette routes, request parsing, error bodies
    mlflow_api    MlflowApi: one async method per MLflow endpoint; reads through the query
                  domain (RunSearch, MetricHistory, Store reads), writes through the ingest
                  service (an IngestPort: gRPC in every deployment)
    mlflow_history MlflowHistories: metrics/get-history and get-history-bulk-interval
    experiments   experiment search: MLflow's filter and order_by for experiments, pages
    convert       JSON in and out, in MLflow's shapes (proto JSON with int64 as numbers)
    errors        MlflowError and the one mapping to MLflow's error codes and HTTP statuses
    mlflow_plugin the MLflow tracking-store plugin (`trackhouse://`), imported only by MLflow

This file imports nothing, so MLflow can load the plugin without the server's dependencies.
"""
