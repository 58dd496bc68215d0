# MLflow tracking server for the cluster: PostgreSQL backend store (psycopg2), artifacts proxied to MinIO/S3
# (boto3), the basic-auth app (mlflow[auth]: Flask-WTF). Small on purpose: the server needs neither torch nor the
# project.
#
# Build (the context is this folder; nothing else is copied):
#   docker build -f infra/docker/mlflow.Dockerfile -t REGISTRY/blip-mlflow:3.17.2 infra/docker
# Keep MLFLOW_VERSION equal to the image tag used in infra/k8s and to the mlflow the project's clients use.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG MLFLOW_VERSION=3.17.2

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GIT_PYTHON_REFRESH=quiet \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

RUN pip install "mlflow[auth]==${MLFLOW_VERSION}" "psycopg2-binary==2.9.10" "boto3>=1.35,<2" \
    && python -c "import mlflow, psycopg2, boto3, flask_wtf; print('mlflow', mlflow.__version__)"

RUN groupadd --gid 1000 mlflow \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/mlflow --shell /usr/sbin/nologin mlflow

ENV HOME=/home/mlflow
USER 1000:1000
WORKDIR /home/mlflow
EXPOSE 5000

CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
