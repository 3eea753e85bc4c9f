# gcl on the official Ray image (Python 3.11), installed with the tested pins; runs as the
# image's non-root user `ray`. Referenced by the KubeRay manifests in cluster/.
FROM rayproject/ray:2.60.0-py311-cpu
WORKDIR /home/ray/gcl
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users gcl ./gcl
COPY --chown=ray:users workflows ./workflows
RUN pip install --no-cache-dir -c constraints.txt . && gcl --help > /dev/null
USER ray
ENV MLFLOW_TRACKING_URI=""
CMD ["gcl", "--help"]
