FROM python:3.13-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fltraining ./fltraining
COPY routes ./routes
RUN pip install --no-cache-dir . && useradd --system --create-home fltraining
USER fltraining
# The data directory (staged uploads; blobs with the `files` store) belongs to the service's user.
ENV FLTRAINING_HOST=0.0.0.0 FLTRAINING_PORT=8000 FLTRAINING_DATA_DIR=/home/fltraining/data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
CMD ["fltraining", "serve", "--workers", "2"]
