"""dataflow/: the launcher, the flex template and the worker images, and a real Dataflow job build.

The job test builds the `mine` job with DataflowRunner for real and writes it as a classic template
(`--template_location`) instead of submitting it: Beam builds the sdist from setup.py, pickles every
DoFn, and stages the package, the pipeline proto and the pickled session to gs:// - here the GCS
emulator on 127.0.0.1, inside a private network namespace, so nothing can reach Google.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import re
import sys
import tarfile
from pathlib import Path

import apache_beam
import pytest
from apache_beam.internal import pickler
from apache_beam.portability.api import beam_runner_api_pb2

from magiclens.cli import main
from gcs_emulator import IN_PRIVATE_NETWORK, PROJECT, download, gcs_emulator, listing, rerun_in_private_network, upload

ROOT = Path(__file__).resolve().parent.parent
DATAFLOW = ROOT / "dataflow"


def load(name: str):
    """dataflow/ holds scripts, not a package: import one by path."""
    spec = importlib.util.spec_from_file_location(f"dataflow_{name}", DATAFLOW / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch = load("launch")


def options_of(command: list[str]) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in command if arg.startswith("--") and "=" in arg)


# --- the launcher ---------------------------------------------------------------------------------


def test_dataflow_launcher_spells_out_the_documented_flags():
    command, print_only = launch.build_command([
        "dataflow", "--project", "my-project", "--region", "europe-west4", "--temp-location", "gs://b/tmp",
        "--max-workers", "50", "--print-only", "mine", "--crawl", "CC-MAIN-2024-33", "--output", "gs://b/out",
    ])
    assert print_only
    assert command[:4] == [sys.executable, "-m", "magiclens", "mine"]
    assert command[4:8] == ["--crawl", "CC-MAIN-2024-33", "--output", "gs://b/out"]
    options = options_of(command[8:])
    assert options == {
        "runner": "DataflowRunner", "project": "my-project", "region": "europe-west4",
        "temp_location": "gs://b/tmp", "staging_location": "gs://b/tmp/staging",
        "machine_type": "n2-standard-4", "max_num_workers": "50", "setup_file": str(ROOT / "setup.py"),
    }
    assert Path(options["setup_file"]).is_file()


def test_dataflow_launcher_gpu_workers_use_the_container_and_the_accelerator_option():
    command, _ = launch.build_command([
        "dataflow", "--project", "p", "--region", "us-central1", "--temp-location", "gs://b/tmp",
        "--gpu", "nvidia-l4", "--container-image", "us-docker.pkg.dev/p/r/magiclens-gpu:0.1.0", "--disk-size-gb", "100",
        "instruct", "--pairs", "gs://b/mined/pairs", "--output", "gs://b/instructed",
    ])
    options = options_of(command)
    assert options["dataflow_service_options"] == "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
    assert options["experiments"] == "no_use_multiple_sdk_containers"
    assert options["sdk_container_image"] == "us-docker.pkg.dev/p/r/magiclens-gpu:0.1.0"
    assert options["machine_type"] == "g2-standard-8" and options["disk_size_gb"] == "100"
    assert "setup_file" not in options  # the image has the package
    assert launch.worker_accelerator("nvidia-tesla-t4:2") == "worker_accelerator=type:nvidia-tesla-t4;count:2;install-nvidia-driver"
    for bad in ("l4", "nvidia-l4:0", "nvidia-l4:two"):
        with pytest.raises(SystemExit, match="TYPE\\[:COUNT\\]"):
            launch.worker_accelerator(bad)
    with pytest.raises(SystemExit, match="gs:// path"):
        launch.build_command(["dataflow", "--project", "p", "--region", "r", "--temp-location", "/tmp/x", "mine"])


def test_flink_launcher_environments(tmp_path):
    jar = tmp_path / f"beam-runners-flink-1.19-job-server-{launch.BEAM_VERSION}.jar"
    jar.write_bytes(b"PK")
    base = ["flink", "--flink-master", "jobmanager:8081", "--job-server-jar", str(jar)]
    docker = options_of(launch.build_command([*base, "mine", "--input", "gs://b/*.warc.gz"])[0])
    assert docker["runner"] == "FlinkRunner" and docker["flink_master"] == "jobmanager:8081"
    assert docker["flink_job_server_jar"] == str(jar)
    assert docker["environment_type"] == "DOCKER"
    assert docker["environment_options"] == f"docker_container_image=apache/beam_python3.11_sdk:{launch.BEAM_VERSION}"
    assert docker["setup_file"] == str(ROOT / "setup.py")
    process = options_of(launch.build_command([*base, "--environment-type", "PROCESS", "mine"])[0])
    assert process["environment_options"] == "process_command=/opt/apache/beam/boot"
    external = options_of(launch.build_command(
        ["flink", "--job-endpoint", "localhost:8099", "--environment-type", "EXTERNAL", "--environment-config",
         "localhost:50000", "--parallelism", "8", "mine"])[0])
    assert external == {"runner": "PortableRunner", "job_endpoint": "localhost:8099", "environment_type": "EXTERNAL",
                        "environment_config": "localhost:50000", "parallelism": "8"}
    with pytest.raises(SystemExit, match="needs --environment-config"):
        launch.build_command(["flink", "--job-endpoint", "localhost:8099", "--environment-type", "EXTERNAL", "mine"])
    with pytest.raises(SystemExit, match="is not a file"):
        launch.build_command(["flink", "--flink-master", "h:8081", "--job-server-jar", str(tmp_path / "no.jar"), "mine"])
    with pytest.raises(SystemExit, match="needs --job-server-jar"):
        launch.build_command(["flink", "--flink-master", "h:8081", "mine"])


# --- the flex template ----------------------------------------------------------------------------


def test_flex_template_parameters_become_magiclens_options():
    flex_main = load("flex_main")
    argv = flex_main.magiclens_argv([
        "--crawl=CC-MAIN-2024-33", "--warc_limit=3", "--no_fetch=true", "--input=gs://a/*.gz, gs://b/*.gz",
        "--output=gs://b/out", "--project=p", "--temp_location=gs://b/tmp", "--staging_location=gs://b/st",
    ])
    assert argv == [
        "mine", "--crawl=CC-MAIN-2024-33", "--warc-limit=3", "--no-fetch", "--input=gs://a/*.gz", "--input=gs://b/*.gz",
        "--output=gs://b/out", "--project=p", "--temp_location=gs://b/tmp", "--staging_location=gs://b/st",
        "--runner=DataflowRunner",
    ]
    assert flex_main.magiclens_argv(["--command=instruct", "--no_fetch=false", "--pairs=gs://b/p", "--runner=X"]) == [
        "instruct", "--no_fetch=false", "--pairs=gs://b/p", "--runner=X"]
    with pytest.raises(SystemExit, match="one of mine, instruct"):
        flex_main.magiclens_argv(["--command=train"])


def test_flex_template_metadata_names_only_real_options():
    flex_main = load("flex_main")
    metadata = json.loads((DATAFLOW / "flex-template.json").read_text())
    assert metadata["name"] and metadata["description"]
    declared = set()
    for command in flex_main.FLEX_COMMANDS:
        declared |= {option for action in flex_main.command_parser(command)._actions for option in action.option_strings}
    names = [parameter["name"] for parameter in metadata["parameters"]]
    assert len(names) == len(set(names))
    for parameter in metadata["parameters"]:
        assert set(parameter) <= {"name", "label", "helpText", "isOptional", "regexes"}
        assert re.fullmatch(r"[a-z][a-z0-9_]*", parameter["name"])
        assert parameter["name"] == "command" or "--" + parameter["name"].replace("_", "-") in declared, parameter["name"]
        for regex in parameter.get("regexes", []):
            re.compile(regex)
    crawl = next(p for p in metadata["parameters"] if p["name"] == "crawl")
    assert re.fullmatch(crawl["regexes"][0], "CC-MAIN-2024-33") and not re.fullmatch(crawl["regexes"][0], "2024-33")


def test_worker_images_match_the_launching_sdk():
    for name in ("Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.launcher"):
        text = (DATAFLOW / name).read_text()
        assert f"BEAM_VERSION={apache_beam.__version__}" in text, name
        for package in ("setup.py", "magiclens", "pipeline", "model", "prompts"):
            assert re.search(rf"^COPY {package} ", text, re.MULTILINE), (name, package)
    assert launch.BEAM_VERSION == apache_beam.__version__
    assert sys.version_info[:2] == (3, 11)  # the images run Python 3.11, as the launcher must
    gpu = (DATAFLOW / "Dockerfile.gpu").read_text()
    assert "COPY --from=beam /opt/apache/beam /opt/apache/beam" in gpu
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in gpu and "RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1" in gpu
    assert "FLEX_TEMPLATE_PYTHON_PY_FILE=/template/dataflow/flex_main.py" in (DATAFLOW / "Dockerfile.launcher").read_text()


# --- the job, built for real ----------------------------------------------------------------------


def test_mine_dataflow_job_is_built_pickled_and_staged_to_gcs(tmp_path, shared_data):
    if rerun_in_private_network(__file__, "test_mine_dataflow_job_is_built_pickled_and_staged_to_gcs"):
        return
    assert IN_PRIVATE_NETWORK
    with gcs_emulator(tmp_path) as bucket:
        warc = shared_data / "warc/webarchive/ukwa_wikipedia-post-blackout.warc.gz"
        upload(warc, f"{bucket}/warcs/{warc.name}")
        template = tmp_path / "mine-template.json"
        command, _ = launch.build_command([
            "dataflow", "--project", PROJECT, "--region", "us-central1", "--temp-location", f"{bucket}/tmp",
            "--max-workers", "7", "--job-name", "magiclens-mine-test", "--template-location", str(template),
            "mine", "--input", f"{bucket}/warcs/*.warc.gz", "--output", f"{bucket}/mined", "--no-fetch",
        ])
        assert command[:3] == [sys.executable, "-m", "magiclens"]
        assert main(command[3:]) == 0  # in this process: the namespace's test run already paid for importing Beam

        job = json.loads(template.read_text())
        assert job["name"] == "magiclens-mine-test" and job["type"] == "JOB_TYPE_BATCH"
        options = job["environment"]["sdkPipelineOptions"]["options"]
        assert options["runner"] == "DataflowRunner" and options["project"] == PROJECT
        assert options["region"] == "us-central1" and options["machine_type"] == "n2-standard-4"
        assert options["max_num_workers"] == 7 and options["setup_file"] == str(ROOT / "setup.py")
        staging = options["staging_location"]
        assert staging.startswith(f"{bucket}/tmp/staging/magiclens-mine-test.")
        assert options["temp_location"].startswith(f"{bucket}/tmp/magiclens-mine-test.")
        pool = job["environment"]["workerPools"][0]
        assert pool["machineType"] == "n2-standard-4" and pool["autoscalingSettings"]["maxNumWorkers"] == 7
        packages = {package["name"] for package in pool["packages"]}
        assert "workflow.tar.gz" in packages

        staged = {path.rsplit("/", 1)[1] for path in listing(f"{staging}/*")}
        assert {"workflow.tar.gz", "pipeline.pb"} <= staged
        # the staged package is the sdist of setup.py, with every module the workers import
        with tarfile.open(fileobj=io.BytesIO(download(f"{staging}/workflow.tar.gz"))) as sdist:
            names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
        sources = [str(path.relative_to(ROOT)) for folder in ("magiclens", "pipeline")
                   for path in (ROOT / folder).rglob("*.py") if "__pycache__" not in path.parts]
        assert len(sources) > 20 and "setup.py" in names
        for module in sources:
            assert module in names, module
        assert any(name.startswith("prompts/") and name.endswith(".yaml") for name in names)

        # the pipeline proto holds mine's stages, and their DoFns unpickle to our classes
        pipeline = beam_runner_api_pb2.Pipeline.FromString(download(options["pipelineUrl"]))
        dofns = {}
        for transform in pipeline.components.transforms.values():
            if transform.spec.urn == "beam:transform:pardo:v1":
                payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
                if payload.do_fn.urn == "beam:dofn:pickled_python_info:v1":
                    dofns[transform.unique_name] = pickler.loads(payload.do_fn.payload)[0]
        ours = [dofn for dofn in dofns.values() if type(dofn).__module__.startswith("magiclens.pipeline.")]
        assert len(ours) >= 4
        for dofn in ours:  # each resolves to the class the workers will import from the staged package
            assert getattr(importlib.import_module(type(dofn).__module__), type(dofn).__name__) is type(dofn)
        assert listing(f"{bucket}/mined/*") == []  # a template only: nothing ran
