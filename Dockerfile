FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY suanwang ./suanwang
COPY broker ./broker
COPY regions ./regions
COPY adapters ./adapters
COPY seeds ./seeds
RUN pip install . && useradd --system --no-create-home --uid 10001 suanwang

USER suanwang
EXPOSE 8080
ENTRYPOINT ["suanwang"]
CMD ["serve", "--http", "0.0.0.0:8080"]
