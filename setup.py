"""sparsejax: one transform for sparsity in JAX/Flax models."""

from setuptools import find_packages, setup

# compiler/ and models/ sit at the top of the repository but install under the
# `sparsejax` namespace, so site-packages gains exactly one top-level package.
# Each root's subpackages are found, not listed, so none (compiler.passes, ...) can be missed.
ROOTS = {"sparsejax": "sparsejax", "sparsejax.compiler": "compiler", "sparsejax.models": "models"}


def package_dirs() -> dict[str, str]:
    dirs = {}
    for name, folder in ROOTS.items():
        dirs[name] = folder
        # sparsejax/compiler and sparsejax/models may be development symlinks to the roots
        # above: they are packaged from their own folders, not twice.
        exclude = ["compiler", "compiler.*", "models", "models.*"] if name == "sparsejax" else []
        for sub in find_packages(folder, exclude=exclude):
            dirs[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return dirs


PACKAGE_DIRS = package_dirs()

setup(
    name="sparsejax",
    version="0.1.0",
    description="Sparsity for JAX/Flax through a jaxpr-rewriting transform.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    # Measured fastest paths per device kind (sparsejax.kernels.path_choice), shipped as tables.
    package_data={"sparsejax.kernels": ["path_tables/*.json"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.10",
        "optax>=0.2.4",
        "chex>=0.1.88",
        "orbax-checkpoint>=0.11",
        "absl-py>=2.1",
        "numpy>=1.26",
        "matplotlib>=3.8",      # train.py's loss and sparsity plot
        "tensorboardX>=2.6",    # train.py's TensorBoard event files
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3", "scikit-learn>=1.4", "nbclient>=0.10",
                "nbformat>=5.10", "ipykernel>=6"],
        "vision": ["scikit-learn>=1.4"],
        "notebooks": ["jupyter", "scikit-learn>=1.4"],
        "gpu": ["jax[cuda12]>=0.10"],
    },
)
