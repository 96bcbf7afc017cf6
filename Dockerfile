# freshrec's roles (sink, stream, train; serve as it arrives) in one image.
#
# torch from PyPI is a large CUDA build. On a CPU-only host, install a CPU wheel of torch first
# (for example from your package index's CPU-only channel) and `pip install .` keeps it.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/freshrec
COPY pyproject.toml README.md ./
COPY freshrec ./freshrec
COPY streams ./streams
COPY learners ./learners
COPY publishers ./publishers
RUN pip install . \
    && useradd --system --create-home --home-dir /var/lib/freshrec freshrec

USER freshrec
ENV FRESHREC_HOME=/var/lib/freshrec
ENTRYPOINT []
CMD ["freshrec", "--help"]
