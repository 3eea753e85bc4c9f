# gcl on the official Ray image (Ray 2.60.0, Python 3.11), installed with the tested pins; runs
# as the image's non-root user `ray`. The KubeRay manifests and launcher config in cluster/
# reference it. CPU by default; for GPU nodes build on a CUDA variant:
#   docker build -t gcl:0.1.0 .
#   docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128 -t gcl:0.1.0-gpu .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}
WORKDIR /home/ray/gcl
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users gcl ./gcl
COPY --chown=ray:users workflows ./workflows
USER ray
RUN pip install --no-cache-dir -c constraints.txt . && gcl --help > /dev/null
# Compile exact top-k search's numba kernels into numba's on-disk cache now, not on every node's
# first evaluation (a node with another CPU recompiles, about 2 s).
RUN python -c "import torch; from gcl.retrieval import exact_top_k; exact_top_k(torch.randn(4, 8), torch.randn(16, 8), 2)"
# Tracking URI and credentials come from the cluster's environment (secrets), never the image.
ENV TOKENIZERS_PARALLELISM=false
CMD ["gcl", "--help"]
