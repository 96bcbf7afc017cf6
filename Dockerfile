# freshrec's roles (sink, stream, train, serve) in one image, built once for every service of the stack.
#
# torch comes from its CPU-only wheel index: the stack never uses a GPU, and PyPI's default torch is a
# CUDA build several GB larger. The dependencies are installed in a layer of their own, before the
# code is copied, so a code change rebuilds only the last two layers.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The user and its state folders first: a named volume mounted on a path copies the image's owner,
# so `models` (the snapshot store shared by train and serve) is writable by freshrec, not root.
RUN useradd --system --create-home --home-dir /var/lib/freshrec freshrec \
    && install -d -o freshrec -g freshrec /var/lib/freshrec/models

WORKDIR /opt/freshrec
COPY pyproject.toml ./
RUN pip install --index-url "$TORCH_INDEX_URL" torch \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
       > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY freshrec ./freshrec
COPY streams ./streams
COPY learners ./learners
COPY publishers ./publishers
COPY serving ./serving
COPY evaluation ./evaluation
COPY freshrec_app ./freshrec_app
RUN pip install --no-deps .

USER freshrec
ENV FRESHREC_HOME=/var/lib/freshrec
ENTRYPOINT []
CMD ["freshrec", "--help"]
