"""`magiclens serve` (a real server on 127.0.0.1) and `magiclens search --queries`, with a tiny random model
on the shared photos; the search page is submitted by headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from devtools import open_page
from magiclens import api
from magiclens.cli import main
from magiclens.model.search import Searcher
from magiclens.model.serve import make_server

@pytest.fixture(scope="module")
def photos(shared_data: Path) -> Path:
    return shared_data / "images" / "photos" / "skimage"


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, photos: Path) -> Path:
    output = tmp_path_factory.mktemp("index") / "photos"
    argv = ["index", "--checkpoint", str(tiny_checkpoint), "--images", str(photos), "--output", str(output),
            "--batch-size", "4", "--num-workers", "0"]
    assert main(argv) == 0
    return output


@pytest.fixture(scope="module")
def server(photo_index: Path, tiny_checkpoint: Path):
    searcher = Searcher.open(photo_index, tiny_checkpoint, "cpu")
    httpd = make_server(searcher, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", searcher.index.size
    httpd.shutdown()
    httpd.server_close()


def multipart(fields: dict[str, bytes | str], filename: str = "query.png") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if isinstance(value, bytes) else "")
        data = value if isinstance(value, bytes) else value.encode()
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_json_endpoint_answers_hits_for_an_uploaded_image(server, photos: Path) -> None:
    url, size = server
    coffee = photos / "coffee.png"
    body, content_type = multipart({"image": coffee.read_bytes(), "instruction": "", "k": "3"})
    status, answer = post(f"{url}/api/search", body, content_type)
    assert status == 200 and answer["index_size"] == size
    assert [hit["rank"] for hit in answer["results"]] == [1, 2, 3]
    # with no instruction the query is embedded as its indexed copy: it comes first
    assert answer["results"][0]["id"] == str(coffee.resolve()) and answer["results"][0]["score"] == pytest.approx(1.0, abs=2e-3)

    as_json = json.dumps({"image": base64.b64encode(coffee.read_bytes()).decode(), "instruction": "", "k": 2}).encode()
    status, same = post(f"{url}/api/search", as_json, "application/json")
    assert status == 200 and [hit["id"] for hit in same["results"]] == [hit["id"] for hit in answer["results"][:2]]


def test_bad_requests_get_a_reason(server, shared_data: Path) -> None:
    url, _ = server
    body, content_type = multipart({"instruction": "no image"})
    assert post(f"{url}/api/search", body, content_type) == (400, {"error": "no query image: send it as the field 'image'"})
    broken = (shared_data / "images" / "edgecases" / "imagededup_ukbench09268_corrupt.jpg").read_bytes()
    status, answer = post(f"{url}/api/search", *multipart({"image": broken, "k": "2"}))
    assert status == 400 and "does not decode" in answer["error"]
    status, answer = post(f"{url}/api/search", *multipart({"image": b"x", "k": "1000"}))
    assert status == 400 and "k must be between" in answer["error"]


async def _submit_form(url: str, image: Path, instruction: str, k: int, profile: Path) -> dict:
    async with open_page(url, profile) as page:
        await page.wait_for("document.readyState === 'complete' && !!document.querySelector('form')")
        document = await page.call("DOM.getDocument")
        file_input = await page.call("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="input[type=file]")
        await page.call("DOM.setFileInputFiles", nodeId=file_input["nodeId"], files=[str(image)])
        await page.evaluate(f"document.querySelector('input[name=instruction]').value = {json.dumps(instruction)};"
                            f"document.querySelector('input[name=k]').value = '{k}';"
                            "document.querySelector('button[type=submit]').click(); true")
        await page.wait_for("location.pathname === '/search' && document.readyState === 'complete'"
                            " && [...document.images].every(i => i.complete)")
        return await page.evaluate(
            "({title: document.title, text: document.body.innerText,"
            " widths: [...document.images].map(i => i.naturalWidth)})"
        )


def test_chromium_submits_the_search_form_and_sees_thumbnails(server, photos: Path, tmp_path: Path) -> None:
    url, size = server
    profile = tmp_path / "profile"
    profile.mkdir()
    page = asyncio.run(asyncio.wait_for(_submit_form(f"{url}/", photos / "astronaut.png", "the <same> person", 4, profile), 180))
    assert "the <same> person" in page["title"]
    assert f"Top 4 of {size} images" in page["text"]
    assert len(page["widths"]) == 1 + 4  # the query and its hits
    assert all(width > 0 for width in page["widths"])  # every thumbnail decoded and rendered


def test_search_answers_many_queries_in_one_call(photo_index: Path, tiny_checkpoint: Path, photos: Path,
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queries = tmp_path / "queries.jsonl"
    lines = [{"image": str(photos / "coffee.png"), "instruction": ""},
             {"image": str(photos / "astronaut.png"), "instruction": "the same person outdoors"},
             {"image": "missing.jpg", "instruction": "x"}]
    queries.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    capsys.readouterr()
    code = main(["search", "--index", str(photo_index), "--checkpoint", str(tiny_checkpoint), "--queries", str(queries), "-k", "2"])
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1  # one query failed; the others were answered
    assert len(answers) == 3
    assert [len(answer["results"]) for answer in answers[:2]] == [2, 2]
    assert answers[0]["results"][0]["id"] == str((photos / "coffee.png").resolve())
    assert "cannot read the query image" in answers[2]["error"]


def test_the_api_searches_and_says_what_is_wrong(photo_index: Path, tiny_checkpoint: Path, photos: Path) -> None:
    hits = api.search(index=str(photo_index), checkpoint=str(tiny_checkpoint), image=str(photos / "coffee.png"), k=2)
    assert [hit["rank"] for hit in hits] == [1, 2] and hits[0]["id"] == str((photos / "coffee.png").resolve())
    with pytest.raises(api.CommandError, match="cannot read the query image"):
        api.search(index=str(photo_index), checkpoint=str(tiny_checkpoint), image=str(photos / "missing.png"))


def test_evaluate_warns_when_k_reaches_the_gallery_size(tiny_checkpoint: Path, photos: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ["coffee.png", "astronaut.png", "rocket.jpg", "chelsea.png"]
    image = lambda name: {"bytes": (photos / name).read_bytes(), "path": name}  # noqa: E731
    rows = [{"triplet_id": f"t{i}", "query_image": image(names[i]), "instruction": "the next photo",
             "target_image": image(names[(i + 1) % 4])} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "triplets.parquet")
    capsys.readouterr()
    argv = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "triplets.parquet"),
            "--num-workers", "0", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["gallery"] == 4
    assert "the gallery holds only 4 images, so the metrics at k = 5, 10, 25, 50 rank the whole gallery" in captured.err
