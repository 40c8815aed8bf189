"""One package for users and for Beam workers (staged to Dataflow with --setup_file)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

FOLDERS = ("pipeline", "model", "prompts")
PACKAGES = ["magiclens"] + [
    f"magiclens.{package}" for package in find_packages(include=[f"{folder}*" for folder in FOLDERS])
]
PACKAGE_DIR = {"magiclens": "magiclens"} | {
    package: package.removeprefix("magiclens.").replace(".", "/") for package in PACKAGES[1:]
}

# The version lives in magiclens/version.py; read, not imported, so that setup.py needs none of the dependencies.
VERSION = re.search(
    r'^__version__ = "([^"]+)"$', (Path(__file__).parent / "magiclens" / "version.py").read_text(), re.M
).group(1)

setup(
    name="magiclens",
    version=VERSION,
    description="Open MagicLens data engine: mine image-instruction-image triplets, train and search",
    license="Apache-2.0",  # LICENSE; bundled third-party files in NOTICE
    python_requires=">=3.11",
    # The folders pipeline/, model/ and prompts/ stay at the top of the repository (its layout shows the
    # architecture) but install under `magiclens.`, so no generic top-level name collides with
    # another project's in a user's environment.
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"magiclens.prompts": ["*.yaml"], "magiclens.model": ["assets/*"]},
    include_package_data=True,
    install_requires=[
        "apache-beam>=2.60",  # the pipelines, their runners, FileSystems, Metrics, WriteToParquet
        "fastwarc>=0.14",  # WARC reading (fast, gzip multi-member, Rust core)
        "brotli>=1.0",  # HTTP Content-Encoding: br payloads kept in WARCs
        "zstandard>=0.20",  # HTTP Content-Encoding: zstd payloads kept in WARCs
        "selectolax>=0.3.21",  # Lexbor HTML parser: the default extractor
        "beautifulsoup4>=4.12",  # the alternative extractor (--html-parser bs4)
        "html5lib>=1.1",  # HTML5 tree building for bs4, so that both parsers see one tree
        "webencodings>=0.5",  # charset labels mapped as browsers do (latin1 -> windows-1252)
        "pillow>=10.0",  # image decoding, EXIF orientation, resizing, JPEG encoding
        "imagehash>=4.3",  # the 64-bit perceptual hash (pHash)
        "requests>=2.31",  # Common Crawl WARCs over HTTPS, resumed by Range after a dropped connection
        "aiohttp>=3.9",  # the image fetcher: asynchronous HTTP with connection reuse
        "ftfy>=6.0",  # repairs mojibake in alt text and captions
        "py3langid>=0.4",  # language of image text and pages; its model ships inside the wheel
        "pyarrow>=14",  # Parquet schemas, reading and writing
        "jinja2>=3.1",  # prompt templates
        "pyyaml>=6.0",  # prompt files
        "jsonschema>=4.18",  # validates what an LLM writes against the prompt's output schema
        "numpy>=1.24",
    ],
    extras_require={
        # training, evaluation and CLIP scoring
        "model": ["torch>=2.3", "transformers>=5.0", "safetensors>=0.4", "fsspec>=2023.1",
                  "msgpack>=1.0",  # reads the released Flax checkpoints (convert-official)
                  "tqdm>=4.66",  # progress of evaluate and index
                  "tensorboard>=2.15"],
        "gcp": ["apache-beam[gcp]>=2.60", "gcsfs>=2023.1"],  # gcsfs: training data on gs://
        "s3": ["apache-beam[aws]>=2.60"],  # boto3: WARCs and outputs on s3://
        "vllm": ["vllm>=0.8"],  # the offline batch engine for GPU workers (--writer vllm)
        "faiss": ["faiss-cpu>=1.8"],  # approximate search for large indexes (magiclens search --faiss)
        "webdataset": ["webdataset>=0.2.86"],  # magiclens export --format webdataset
        # bench/bench_images.py's baseline: what img2dataset's Resizer imports. img2dataset itself is
        # installed by `make bench` without its dependencies (they would downgrade pandas and webdataset).
        "bench": ["opencv-python-headless>=4.5.5.62,<5", "albumentations>=1.3,<2"],
        # tests: gs:// paths run against a local GCS emulator
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "apache-beam[gcp]>=2.60", "gcp-storage-emulator>=2024.8",
                "faiss-cpu>=1.8",  # the --faiss search path is tested too,
                "webdataset>=0.2.86",  # and the WebDataset export,
                "datasets>=2.14",  # and that Hugging Face `datasets` reads pairs and triplets as images,
                "markdown>=3.4"],  # and that the dataset card renders as Markdown
    },
    entry_points={"console_scripts": ["magiclens=magiclens.cli:main"]},
)
