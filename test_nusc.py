"""Tests of the nuScenes-lidarseg reader (nusc.py) and its synthetic scenes (synthnusc.py):
the class mapping read from category.json, the projection chain against an independent
computation, the sweeps, the devkit's evaluation rules, the submission format, bad input."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

import elite
import nusc
import scandata
import synthnusc

VERSION = synthnusc.VERSION


def tables_of(root):
    return nusc.read_tables(root, VERSION)


# ------------------------------------------------------------------------------------
# 1. The tables: the official schema, rows that do not hold together
# ------------------------------------------------------------------------------------

# The official schema (nuscenes-devkit's docs/schema_nuscenes.md): every field of every table
# the devkit's NuScenes(version, dataroot) loads, with lidarseg's.
SCHEMA = {
    "attribute": {"token", "name", "description"},
    "calibrated_sensor": {"token", "sensor_token", "translation", "rotation", "camera_intrinsic"},
    "category": {"token", "name", "description", "index"},
    "ego_pose": {"token", "translation", "rotation", "timestamp"},
    "instance": {"token", "category_token", "nbr_annotations", "first_annotation_token", "last_annotation_token"},
    "lidarseg": {"token", "filename", "sample_data_token"},
    "log": {"token", "logfile", "vehicle", "date_captured", "location"},
    "map": {"token", "log_tokens", "category", "filename"},
    "sample": {"token", "timestamp", "scene_token", "next", "prev"},
    "sample_annotation": {"token", "sample_token", "instance_token", "attribute_tokens", "visibility_token",
                          "translation", "size", "rotation", "num_lidar_pts", "num_radar_pts", "next", "prev"},
    "sample_data": {"token", "sample_token", "ego_pose_token", "calibrated_sensor_token", "filename", "fileformat",
                    "width", "height", "timestamp", "is_key_frame", "next", "prev"},
    "scene": {"token", "name", "description", "log_token", "nbr_samples", "first_sample_token", "last_sample_token"},
    "sensor": {"token", "channel", "modality"},
    "visibility": {"token", "level", "description"},
}


@pytest.mark.parametrize("version", [synthnusc.VERSION, synthnusc.TEST_VERSION])
def test_synthetic_tables_follow_the_official_schema_and_link_as_the_real_ones(synth_nusc, version):
    folder = synth_nusc / version
    labelled = version == synthnusc.VERSION
    assert {p.stem for p in folder.glob("*.json")} == set(SCHEMA) - ({"lidarseg"} if not labelled else set())
    rows = {t: json.loads((folder / f"{t}.json").read_text()) for t in SCHEMA if (folder / f"{t}.json").is_file()}
    for table, fields in SCHEMA.items():
        for row in rows.get(table, []):
            assert set(row) == fields, (table, set(row) ^ fields)
    tokens = {t: {r["token"] for r in rs} for t, rs in rows.items()}
    for t, rs in rows.items():
        assert len(tokens[t]) == len(rs), t  # tokens are unique
    links = [("scene", "log_token", "log"), ("scene", "first_sample_token", "sample"),
             ("scene", "last_sample_token", "sample"), ("sample", "scene_token", "scene"),
             ("sample_data", "sample_token", "sample"), ("sample_data", "ego_pose_token", "ego_pose"),
             ("sample_data", "calibrated_sensor_token", "calibrated_sensor"),
             ("calibrated_sensor", "sensor_token", "sensor"), ("lidarseg", "sample_data_token", "sample_data")]
    for table, field, target in links:
        assert all(r[field] in tokens[target] for r in rows.get(table, [])), (table, field)
    for table in ("sample", "sample_data"):
        assert all(r[k] in tokens[table] | {""} for r in rows[table] for k in ("next", "prev"))
    assert {t for m in rows["map"] for t in m["log_tokens"]} == tokens["log"]  # every log has its map
    assert all((synth_nusc / m["filename"]).is_file() for m in rows["map"])  # the mask the devkit checks for
    assert len(rows["attribute"]) == 8 and len(rows["visibility"]) == 4 and rows["instance"] == []
    channel = {r["token"]: r["channel"] for r in rows["sensor"]}
    sensor_of = {r["token"]: channel[r["sensor_token"]] for r in rows["calibrated_sensor"]}
    lidar_keyframes = [r for r in rows["sample_data"] if r["is_key_frame"] and
                       sensor_of[r["calibrated_sensor_token"]] == "LIDAR_TOP"]
    if labelled:  # a lidarseg row's token is its LiDAR sample_data token; one label file per row
        assert sorted(r["token"] for r in rows["lidarseg"]) == sorted(r["sample_data_token"] for r in rows["lidarseg"])
        assert sorted(r["token"] for r in rows["lidarseg"]) == sorted(r["token"] for r in lidar_keyframes)
        assert len(list((synth_nusc / "lidarseg" / version).glob("*.bin"))) == len(rows["lidarseg"])
    else:
        assert not (synth_nusc / "lidarseg" / version).exists()
    rotations = {tuple(np.round(r["rotation"], 6)) for r in rows["ego_pose"]}
    assert len(rotations) == len(rows["ego_pose"])  # the car turns: no two poses share a rotation
    assert all(abs(np.linalg.norm(r["rotation"]) - 1) < 1e-9 for r in rows["ego_pose"])


def test_the_test_version_reads_with_lidarseg_absent_or_empty(synth_nusc, tmp_path):
    root = tmp_path / "nusc"
    shutil.copytree(synth_nusc / synthnusc.TEST_VERSION, root / synthnusc.TEST_VERSION)
    for lidarseg in (None, "[]"):
        if lidarseg is not None:
            (root / synthnusc.TEST_VERSION / "lidarseg.json").write_text(lidarseg)
        tables = nusc.read_tables(root, synthnusc.TEST_VERSION)
        frames = nusc.keyframes(tables, root, nusc.split_scenes(tables, "test"), labelled=False)
        assert len(frames) == 2 and all(f.labels is None for f in frames)
    with pytest.raises(scandata.DataError, match=r"v1\.0-test: holds the test scenes only"):
        nusc.split_scenes(tables, "val")


def first(rows, **where):
    return next(r for r in rows if all(r.get(k) == v for k, v in where.items()))


def camera_calibration(tables_dir):
    sensors = json.loads((tables_dir / "sensor.json").read_text())
    camera = first(sensors, modality="camera")["token"]
    return lambda rows: first(rows, sensor_token=camera)


@pytest.mark.parametrize("table, spoil, message", [
    ("sample_data.json", lambda rows, d: rows[0].pop("filename"),
     r"sample_data\.json: row \w+: 'filename' is None, not a string"),
    ("sample_data.json", lambda rows, d: rows[0].update(is_key_frame="yes"),
     r"sample_data\.json: row \w+: 'is_key_frame' is 'yes', not true or false"),
    ("scene.json", lambda rows, d: rows[0].update(name=3), r"scene\.json: row \w+: 'name' is 3, not a string"),
    ("sensor.json", lambda rows, d: rows[0].pop("channel"), r"sensor\.json: row \w+: 'channel' is None, not a string"),
    ("sample_data.json", lambda rows, d: rows[0].update(token="../../elsewhere/" + rows[0]["token"]),
     r"sample_data\.json: row '\.\./\.\./elsewhere/\w+': 'token' holds characters other than letters, digits, "
     r"'_' and '-' .* would name a file outside --out"),
    ("scene.json", lambda rows, d: rows[0].update(first_sample_token="nope"),
     r"scene\.json: row .*: 'first_sample_token' is 'nope', not a token of sample\.json"),
    ("sample_data.json", lambda rows, d: rows[0].update(calibrated_sensor_token="gone"),
     r"sample_data\.json: row .*: 'calibrated_sensor_token' is 'gone', not a token of calibrated_sensor\.json"),
    ("ego_pose.json", lambda rows, d: rows[0].update(rotation=[0, 0, 0, 0]),
     r"ego_pose\.json: row .*: 'rotation' is \[0, 0, 0, 0\], not a non-zero quaternion"),
    ("calibrated_sensor.json", lambda rows, d: camera_calibration(d)(rows).update(camera_intrinsic=[]),
     r"calibrated_sensor\.json: row .*: 'camera_intrinsic' is \[\], not a camera's 3 x 3 matrix"),
    ("calibrated_sensor.json", lambda rows, d: rows[0].update(translation=["1", None, 3]),
     r"calibrated_sensor\.json: row .*: 'translation' is \['1', None, 3\], not 3 finite numbers"),
    # the fault-hunting round 2 (issue 34): a mirrored camera, and a token naming two rows
    ("calibrated_sensor.json", lambda rows, d: camera_calibration(d)(rows)["camera_intrinsic"][0].__setitem__(0, -500.0),
     r"calibrated_sensor\.json: row .*: 'camera_intrinsic' has focal lengths \(-500, [\d.]+\) .* must be positive"),
    ("calibrated_sensor.json", lambda rows, d: rows.append(rows[0] | {"rotation": [0.0, 1.0, 0.0, 0.0]}),
     r"calibrated_sensor\.json: token \w+ names two different rows"),
    ("sample.json", lambda rows, d: rows.append(dict(rows[0])), None),  # the same row twice: harmless
])
def test_tables_that_do_not_hold_together_are_refused_by_row_and_field(synth_nusc, tmp_path, table, spoil, message):
    root = tmp_path / "nusc"
    shutil.copytree(synth_nusc / VERSION, root / VERSION)
    rows = json.loads((root / VERSION / table).read_text())
    spoil(rows, root / VERSION)
    (root / VERSION / table).write_text(json.dumps(rows))
    if message is None:
        nusc.read_tables(root, VERSION)
        return
    with pytest.raises(scandata.DataError, match=message):
        nusc.read_tables(root, VERSION)


def test_a_table_nested_deeper_than_python_recurses_is_one_line(synth_nusc, tmp_path):
    root = tmp_path / "nusc"
    shutil.copytree(synth_nusc / VERSION, root / VERSION)
    (root / VERSION / "sample.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(scandata.DataError, match=r"sample\.json: not a table of the nuScenes schema \(RecursionError"):
        nusc.read_tables(root, VERSION)


def test_samples_whose_next_loops_back_are_refused_not_followed_forever(synth_nusc, tmp_path):
    root = tmp_path / "nusc"
    shutil.copytree(synth_nusc / VERSION, root / VERSION)
    samples = json.loads((root / VERSION / "sample.json").read_text())
    scenes = json.loads((root / VERSION / "scene.json").read_text())
    by_token = {s["token"]: s for s in samples}
    head = by_token[scenes[0]["first_sample_token"]]
    second = by_token[head["next"]]
    second["next"] = head["token"]  # back to the scene's first sample
    (root / VERSION / "sample.json").write_text(json.dumps(samples))
    tables = nusc.read_tables(root, VERSION)
    with pytest.raises(scandata.DataError, match=rf"sample\.json: the samples of scene {scenes[0]['name']} loop: 'next' "
                                                 rf"leads back to sample {head['token']}"):
        nusc.keyframes(tables, root, [tables["scene"][scenes[0]["token"]]], labelled=False)


def test_synthetic_scenes_keep_the_world_they_were_made_with(tmp_path, capsys):
    """issue 34: the scenes' record holds every input that makes them (seed, columns, image scale);
    a run extended or started again with others keeps the recorded world, with a note, instead of
    mixing two worlds in one folder."""
    root = tmp_path / "s"
    synthnusc.write_marker(root, 3, 0.25, 64)  # as a first run leaves it, broken off before its first file
    synthnusc.make_dataset(root, {"scene-0001": 1}, seed=0, columns=64, progress=False, test_scenes={})
    assert "holds synthetic nuScenes scenes made with seed 3, 64 columns" in capsys.readouterr().out
    first = sorted((root / "samples" / "LIDAR_TOP").iterdir())[0].read_bytes()
    other = synthnusc.make_dataset(tmp_path / "o", {"scene-0001": 1}, seed=3, columns=64, progress=False,
                                   test_scenes={})
    assert sorted((other / "samples" / "LIDAR_TOP").iterdir())[0].read_bytes() == first  # seed 3's streets
    (root / synthnusc.MARKER).write_text(json.dumps({"format": synthnusc.FORMAT, "seed": "3"}))
    with pytest.raises(ValueError, match=r"synthnusc\.json: expected \{\"format\": int, \"seed\": int"):
        synthnusc.make_dataset(root, {"scene-0001": 1}, columns=64, progress=False, test_scenes={})


def test_synthetic_scenes_of_an_older_format_are_written_again_and_real_tables_are_refused(tmp_path):
    root = synthnusc.make_dataset(tmp_path / "s", {"scene-0001": 1}, columns=64, progress=False, test_scenes={})
    assert json.loads((root / synthnusc.MARKER).read_text()) == {"format": synthnusc.FORMAT, "seed": 0, "columns": 64,
                                                               "image_scale": 0.25}
    points = next((root / "samples" / "LIDAR_TOP").iterdir())
    fresh = points.read_bytes()
    points.write_bytes(fresh[:-20])  # as an older format's file would differ
    synthnusc.make_dataset(root, {"scene-0001": 1}, columns=64, progress=False, test_scenes={})
    assert len(points.read_bytes()) == len(fresh) - 20  # the same format: files already there are kept
    (root / synthnusc.MARKER).unlink()  # scenes written before the marker: format 1
    synthnusc.make_dataset(root, {"scene-0001": 1}, columns=64, progress=False, test_scenes={})
    assert points.read_bytes() == fresh and (root / synthnusc.MARKER).is_file()
    (root / synthnusc.MARKER).write_text(json.dumps({"format": 3}))  # the format before the record
    synthnusc.make_dataset(root, {"scene-0001": 1}, columns=64, progress=False, test_scenes={})
    assert json.loads((root / synthnusc.MARKER).read_text())["seed"] == 0
    (root / synthnusc.MARKER).unlink()
    log = root / synthnusc.VERSION / "log.json"
    log.write_text(json.dumps([{"token": "t", "logfile": "n015-2018-07-24-11-22-45+0800", "vehicle": "n015",
                                "date_captured": "2018-07-24", "location": "singapore-onenorth"}]))
    with pytest.raises(ValueError, match=r"s: holds nuScenes tables that synthnusc\.py did not write"):
        synthnusc.make_dataset(root, {"scene-0001": 1}, columns=64, progress=False, test_scenes={})
    # Fault-hunting round 4 (issue 34): a real release's v1.0-test, or trainval tables without a
    # log.json, were written over; any table synthnusc.py did not write is now refused, and kept.
    for version, table in ((synthnusc.TEST_VERSION, "log.json"), (synthnusc.VERSION, "sample.json")):
        other = tmp_path / f"real_{version}"
        (other / version).mkdir(parents=True)
        (other / version / table).write_text('[{"token": "mine", "logfile": "n015-2018-07-18"}]')
        with pytest.raises(ValueError, match=rf"real_{version}: holds nuScenes tables that synthnusc\.py did not write"):
            synthnusc.make_dataset(other, {"scene-0001": 1}, columns=64, progress=False, test_scenes={})
        assert "mine" in (other / version / table).read_text()
    # Fault-hunting round 5: a root with the mini release, or with sample files and no tables yet.
    mini = tmp_path / "mini"
    (mini / "v1.0-mini").mkdir(parents=True)
    (mini / "v1.0-mini" / "log.json").write_text('[{"token": "x", "logfile": "n015-2018-07-24"}]')
    with pytest.raises(ValueError, match=r"mini: holds nuScenes tables that synthnusc\.py did not write"):
        synthnusc.make_dataset(mini, {"scene-0001": 1}, columns=64, progress=False, test_scenes={})
    samples = tmp_path / "downloading" / "samples" / "LIDAR_TOP"
    samples.mkdir(parents=True)
    (samples / "real.pcd.bin").write_bytes(b"\0" * 80)
    with pytest.raises(ValueError, match=r"downloading: holds nuScenes files that synthnusc\.py did not write "
                                         r"\(samples/LIDAR_TOP/real\.pcd\.bin"):
        synthnusc.make_dataset(tmp_path / "downloading", {"scene-0001": 1}, columns=64, progress=False, test_scenes={})
    assert sorted(p.name for p in (tmp_path / "downloading").rglob("*")) == ["LIDAR_TOP", "real.pcd.bin", "samples"]


# ------------------------------------------------------------------------------------
# 2. Classes
# ------------------------------------------------------------------------------------

def test_class_mapping_follows_category_names_not_numbers(synth_nusc, tmp_path):
    tables = tables_of(synth_nusc)
    lut = nusc.fine_to_coarse(tables)
    index = {r["name"]: r["index"] for r in tables["category"].values()}
    assert lut[index["vehicle.car"]] == nusc.CLASS_NAMES.index("car")
    assert lut[index["human.pedestrian.police_officer"]] == nusc.CLASS_NAMES.index("pedestrian")
    assert lut[index["vehicle.bus.bendy"]] == lut[index["vehicle.bus.rigid"]] == nusc.CLASS_NAMES.index("bus")
    assert lut[index["static.other"]] == lut[index["noise"]] == lut[index["vehicle.ego"]] == 0
    assert sorted(set(lut[list(index.values())])) == list(range(17))  # 32 fine classes onto 16 + ignore
    # Another numbering in category.json: the map follows the names.
    root = tmp_path / "shuffled"
    shutil.copytree(synth_nusc / VERSION, root / VERSION)
    rows = json.loads((root / VERSION / "category.json").read_text())
    order = np.random.default_rng(0).permutation(len(rows))
    for row, new in zip(rows, order):
        row["index"] = int(new) + 100
    (root / VERSION / "category.json").write_text(json.dumps(rows))
    shuffled = nusc.fine_to_coarse(tables_of(root))
    for row in rows:
        assert shuffled[row["index"]] == lut[index[row["name"]]], row["name"]
    rows[3]["name"] = "vehicle.spaceship"
    (root / VERSION / "category.json").write_text(json.dumps(rows))
    with pytest.raises(scandata.DataError, match="category 'vehicle.spaceship' is not one of the 32"):
        nusc.fine_to_coarse(tables_of(root))
    del rows[3]["index"]
    rows[3]["name"] = "animal"
    (root / VERSION / "category.json").write_text(json.dumps(rows))
    with pytest.raises(scandata.DataError, match="category 'animal' has no 'index'"):
        nusc.fine_to_coarse(tables_of(root))
    rows[3]["index"] = rows[4]["index"]  # two categories on one index: refused, not "the last wins"
    (root / VERSION / "category.json").write_text(json.dumps(rows))
    with pytest.raises(scandata.DataError, match=rf"categories '.*' and '.*' both have index {rows[4]['index']}$") as e:
        nusc.fine_to_coarse(tables_of(root))
    assert {"'animal'", f"'{rows[4]['name']}'"} <= set(re.findall(r"'[^']+'", str(e.value)))
    rows[3]["index"] = "7"  # an index given as a string
    (root / VERSION / "category.json").write_text(json.dumps(rows))
    with pytest.raises(scandata.DataError, match=r"category 'animal' has index '7', not an integer"):
        nusc.fine_to_coarse(tables_of(root))


def test_a_label_index_no_category_claims_is_refused(synth_nusc, tmp_path):
    tables = tables_of(synth_nusc)
    lut = nusc.fine_to_coarse(tables)
    unclaimed = next(i for i in range(256) if i not in {r["index"] for r in tables["category"].values()})
    labels = np.array([lut.argmax(), unclaimed, unclaimed], dtype=np.uint8)
    labels.tofile(tmp_path / "x_lidarseg.bin")
    with pytest.raises(scandata.DataError, match=rf"x_lidarseg\.bin: label index {unclaimed} \(1 such\) is no "
                                                 "category's index in category.json"):
        nusc.read_labels(tmp_path / "x_lidarseg.bin", 3, lut)


# ------------------------------------------------------------------------------------
# 3-4. Splits and keyframes
# ------------------------------------------------------------------------------------

def test_official_splits_and_keyframes(synth_nusc):
    tables = tables_of(synth_nusc)
    assert len(nusc.VAL_SCENES) == 150 and "scene-0003" in nusc.VAL_SCENES and "scene-1073" in nusc.VAL_SCENES
    assert [s["name"] for s in nusc.split_scenes(tables, "train")] == ["scene-0001"]
    assert [s["name"] for s in nusc.split_scenes(tables, "val")] == ["scene-0003"]
    with pytest.raises(scandata.DataError, match="the test scenes are in v1.0-test"):
        nusc.split_scenes(tables, "test")
    mini = nusc.Tables("v1.0-mini", {"scene": {"a": {"name": "scene-0103"}, "b": {"name": "scene-0061"}}})
    assert [s["name"] for s in nusc.split_scenes(mini, "val")] == ["scene-0103"]
    frames = nusc.keyframes(tables, synth_nusc, nusc.split_scenes(tables, "train"))
    assert len(frames) == 3 and [c.channel for c in frames[0].cameras] == list(nusc.CAMERAS)
    stamps = [tables["sample"][f.token]["timestamp"] for f in frames]
    assert stamps == sorted(stamps) and frames[0].points.name.endswith(".pcd.bin")
    points = nusc.read_points(frames[0].points)
    assert points.shape[1] == 5 and set(np.unique(points[:, 4])) <= set(range(32))  # the ring index
    labels = nusc.read_labels(frames[0].labels, len(points), nusc.fine_to_coarse(tables))
    assert labels.shape == (len(points),) and (labels == 0).mean() < 0.05
    image = nusc.read_camera_image(frames[0].cameras[0])
    assert image.shape == (225, 400, 3)


# ------------------------------------------------------------------------------------
# 5. Files: bad input named by file, checked before the first step
# ------------------------------------------------------------------------------------

def test_bad_nuscenes_input_names_the_file(synth_nusc, tmp_path):
    root = tmp_path / "nusc"
    shutil.copytree(synth_nusc, root)
    tables = tables_of(root)
    lut = nusc.fine_to_coarse(tables)
    frame = nusc.keyframes(tables, root, nusc.split_scenes(tables, "train"))[0]
    # A label file whose length differs from its scan.
    labels = frame.labels.read_bytes()
    frame.labels.write_bytes(labels[:-3])
    with pytest.raises(scandata.DataError, match=rf"{frame.labels.name}: \d+ labels but its LiDAR file has \d+ points"):
        nusc.read_labels(frame.labels, len(nusc.read_points(frame.points)), lut)
    frame.labels.unlink()
    with pytest.raises(scandata.DataError, match="lidarseg label file not found"):
        nusc.read_labels(frame.labels, 10, lut)
    # A truncated LiDAR file.
    frame.points.write_bytes(frame.points.read_bytes()[:-6])
    with pytest.raises(scandata.DataError, match=r"\.pcd\.bin: \d+ bytes is not a multiple of 20"):
        nusc.read_points(frame.points)
    # A camera image missing.
    frame.cameras[2].image.unlink()
    with pytest.raises(scandata.DataError, match=r"CAM_FRONT_RIGHT.*\.jpg: camera image not found \(CAM_FRONT_RIGHT"):
        nusc.read_camera_image(frame.cameras[2])
    # A sample without its lidarseg row.
    rows = json.loads((root / VERSION / "lidarseg.json").read_text())
    (root / VERSION / "lidarseg.json").write_text(json.dumps([r for r in rows if r["sample_data_token"] !=
                                                              frame.lidar_token]))
    with pytest.raises(scandata.DataError, match=rf"lidarseg\.json: sample {frame.token} .* has no lidarseg file"):
        nusc.keyframes(tables_of(root), root, nusc.split_scenes(tables_of(root), "train"))
    # A table missing, or not a table.
    (root / VERSION / "ego_pose.json").write_text("{not json")
    with pytest.raises(scandata.DataError, match=r"ego_pose\.json: not a table of the nuScenes schema"):
        tables_of(root)
    (root / VERSION / "ego_pose.json").unlink()
    with pytest.raises(scandata.DataError, match=r"ego_pose\.json: table not found"):
        tables_of(root)
    with pytest.raises(scandata.DataError, match=r"v1\.0-mini: no such folder"):
        nusc.read_tables(root, "v1.0-mini")


def test_non_finite_keyframe_points_at_inference_are_named():
    import infer
    points = np.zeros((3, 5), dtype=np.float32)
    points[1, 0] = np.nan
    with pytest.warns(UserWarning, match=r"kf\.pcd\.bin: 1 points with NaN or Inf values; the submission needs a "
                                         "class for each"):
        pts = infer.nusc_points(points, "kf.pcd.bin")
    assert np.isfinite(pts).all() and len(pts) == 3


def test_every_file_a_run_reads_is_checked_before_its_first_step(synth_nusc, tmp_path):
    import u2mkd
    root = tmp_path / "nusc"
    shutil.copytree(synth_nusc, root)
    tables = tables_of(root)
    train = nusc.keyframes(tables, root, nusc.split_scenes(tables, "train"))
    val = nusc.keyframes(tables, root, nusc.split_scenes(tables, "val"))

    def refused(spoil, restore, build, message):
        saved = spoil()
        try:
            with pytest.raises(scandata.DataError, match=message):
                build()
        finally:
            restore(saved)

    def cut(path):
        data = path.read_bytes()
        path.write_bytes(data[:-8])
        return path, data

    def remove(path):
        data = path.read_bytes()
        path.unlink()
        return path, data

    def put_back(saved):
        saved[0].write_bytes(saved[1])

    last = train[-1]  # the last keyframe of training: reached after every other step
    refused(lambda: cut(last.points), put_back, lambda: nusc.NuScenesScans(root, VERSION, "train", train=True),
            rf"{last.points.name}: \d+ bytes is not a multiple of 20 .*: the file is truncated")
    refused(lambda: remove(val[-1].labels), put_back, lambda: nusc.NuScenesScans(root, VERSION, "val"),
            rf"{val[-1].labels.name}: lidarseg label file not found")
    refused(lambda: cut(val[0].labels), put_back, lambda: nusc.NuScenesScans(root, VERSION, "val"),
            rf"{val[0].labels.name}: \d+ labels but its LiDAR file has \d+ points")
    camera = last.cameras[-1].image
    refused(lambda: remove(camera), put_back, lambda: u2mkd.NuScenesPairData(root, VERSION, "train", train=True),
            rf"{camera.name}: camera image not found \({last.cameras[-1].channel} of sample {last.token}\)")
    nusc.NuScenesScans(root, VERSION, "train", train=True)  # without images, a missing one is not read
    sweep = root / tables["sample_data"][nusc.sweep_tokens(tables, last.lidar_token, 2)[0]]["filename"]
    refused(lambda: remove(sweep), put_back, lambda: nusc.NuScenesScans(root, VERSION, "train", train=True, sweeps=2),
            rf"{sweep.name}: LiDAR sweep not found")

    def as_float64(path):  # the size fits (40 bytes a point = 2 x 20), the values do not
        data = path.read_bytes()
        np.frombuffer(data, dtype=np.float32).astype(np.float64).tofile(path)
        return path, data

    refused(lambda: as_float64(last.points), put_back, lambda: nusc.NuScenesScans(root, VERSION, "train", train=True),
            rf"{last.points.name}: \d+% of its points have coordinates beyond 10 km or below 1e-10 m: not float32 "
            r"\(x, y, z, intensity, ring\) records")


# ------------------------------------------------------------------------------------
# 6. Projection into the cameras
# ------------------------------------------------------------------------------------

def rotate(q, v):
    """v (N, 3) rotated by the unit quaternion q = (w, x, y, z), as q v q*: the devkit's other route."""
    w, r = q[0], np.asarray(q[1:])
    return v + 2 * np.cross(r, np.cross(r, v) + w * v)


def unit(q):
    q = np.asarray(q, dtype=np.float64)
    return q / np.linalg.norm(q)


def test_projection_chain_matches_an_independent_computation():
    """A hand-made frame: the LiDAR, the ego at two times and a camera, all turned and moved.
    Points are placed in the camera frame at known pixels, carried back to the LiDAR by
    quaternion products, and must project onto those pixels."""
    lidar_q, lidar_t = unit([0.70, 0.02, -0.01, -0.71]), np.array([0.9, 0.05, 1.8])
    ego_l_q, ego_l_t = unit([0.96, 0.0, 0.0, 0.28]), np.array([400.0, 1100.0, 0.0])
    ego_c_q, ego_c_t = unit([0.958, 0.0, 0.0, 0.287]), np.array([400.3, 1100.1, 0.0])
    cam_q, cam_t = unit([0.5, -0.5, 0.5, -0.5]), np.array([1.7, 0.0, 1.5])  # z forward, x right, y down
    k = np.array([[1266.4, 0, 816.3], [0, 1266.4, 491.5], [0, 0, 1]])
    row = lambda q, t: {"rotation": list(q), "translation": list(t)}  # noqa: E731
    tables = nusc.Tables("hand-made", {
        "sample_data": {"L": {"ego_pose_token": "eL", "calibrated_sensor_token": "cL"},
                        "C": {"ego_pose_token": "eC", "calibrated_sensor_token": "cC"}},
        "ego_pose": {"eL": row(ego_l_q, ego_l_t), "eC": row(ego_c_q, ego_c_t)},
        "calibrated_sensor": {"cL": row(lidar_q, lidar_t), "cC": row(cam_q, cam_t) | {"camera_intrinsic": k.tolist()}}})
    h, w = 900, 1600
    pixels = np.array([[800.0, 450.0], [10.0, 20.0], [1590.0, 890.0], [0.5, 450.0], [800.0, 899.5], [300.0, 700.0]])
    depth = np.array([10.0, 25.0, 3.0, 8.0, 12.0, 0.9])  # the last is nearer than 1 m
    cam = np.stack([(pixels[:, 0] - k[0, 2]) * depth / k[0, 0], (pixels[:, 1] - k[1, 2]) * depth / k[1, 1], depth], 1)
    inv = lambda q: q * np.array([1, -1, -1, -1])  # noqa: E731  the conjugate: the inverse rotation
    glob = rotate(ego_c_q, rotate(cam_q, cam) + cam_t) + ego_c_t  # camera -> ego (camera time) -> global
    lidar = rotate(inv(lidar_q), rotate(inv(ego_l_q), glob - ego_l_t) - lidar_t)  # -> ego (LiDAR time) -> LiDAR
    seen, uv = nusc.project(lidar, nusc.lidar_to_camera(tables, "L", "C"), k, (h, w))
    inside = (pixels[:, 0] > 0) & (pixels[:, 0] < w - 1) & (pixels[:, 1] > 0) & (pixels[:, 1] < h - 1)
    assert seen.tolist() == (inside & (depth > 1)).tolist() == [True, True, True, True, False, False]
    expected = np.stack([2 * pixels[:, 0] / (w - 1) - 1, 2 * pixels[:, 1] / (h - 1) - 1], 1)
    np.testing.assert_allclose(uv[seen], expected[seen], atol=1e-5)
    assert (uv[~seen] == 0).all()


def test_synthetic_points_project_onto_pixels_of_their_class(synth_nusc):
    """On the synthetic scenes, a LiDAR point's class and the rendered class of the pixel it
    projects onto agree, in all six cameras: the whole chain, the LiDAR's own rotation, both ego
    poses (the cameras fire up to 44 ms after the LiDAR) and every camera's mounting included."""
    tables = tables_of(synth_nusc)
    lut = nusc.fine_to_coarse(tables)
    kitti_to_nusc = {1: "car", 2: "bicycle", 4: "truck", 6: "pedestrian", 9: "driveable_surface", 10: "other_flat",
                     11: "sidewalk", 13: "manmade", 14: "manmade", 15: "vegetation", 16: "vegetation", 17: "terrain",
                     18: "manmade", 19: "manmade"}
    to_coarse = np.zeros(20, dtype=np.int64)
    for kitti, name in kitti_to_nusc.items():
        to_coarse[kitti] = nusc.CLASS_NAMES.index(name)
    frame = nusc.keyframes(tables, synth_nusc, nusc.split_scenes(tables, "train"))[1]
    points = nusc.read_points(frame.points)
    labels = nusc.read_labels(frame.labels, len(points), lut)
    camera, uv = nusc.project_keyframe(tables, frame, points[:, :3])
    assert (camera >= 0).mean() > 0.5  # six cameras see most of the scan
    for k, cam in enumerate(frame.cameras):
        gt = np.load(synth_nusc / "synth_gt" / f"{cam.token}.npy")
        h, w = cam.hw
        m = camera == k
        col = np.round((uv[m, 0] + 1) / 2 * (w - 1)).astype(int)
        row = np.round((uv[m, 1] + 1) / 2 * (h - 1)).astype(int)
        pixel = to_coarse[gt[row, col]]
        both = (labels[m] != 0) & (pixel != 0)
        assert both.sum() > 300 and (pixel[both] == labels[m][both]).mean() > 0.9, cam.channel


def test_a_point_two_cameras_see_is_splatted_into_both_and_takes_the_last_cameras_pixel(synth_nusc):
    """U2MKD's camera order (FRONT_LEFT, FRONT, FRONT_RIGHT, BACK_LEFT, BACK, BACK_RIGHT): L2C
    splats a point into every image that holds it; C2L reads the last camera's pixel."""
    import u2mkd
    tables = tables_of(synth_nusc)
    frame = nusc.keyframes(tables, synth_nusc, nusc.split_scenes(tables, "train"))[1]
    assert [c.channel for c in frame.cameras] == list(nusc.CAMERAS) and nusc.CAMERAS[0] == "CAM_FRONT_LEFT"
    points = nusc.read_points(frame.points)
    sightings = nusc.camera_sightings(tables, frame, points[:, :3])
    twice = np.bincount(sightings.point, minlength=len(points)) == 2
    assert twice.sum() > 50  # the cameras overlap
    camera, uv = nusc.last_sighting(sightings, len(points))
    for p in np.flatnonzero(twice)[:20]:
        mine = np.flatnonzero(sightings.point == p)
        assert camera[p] == sightings.camera[mine].max() and np.array_equal(uv[p], sightings.uv[mine[-1]])
    data = u2mkd.NuScenesPairData(synth_nusc, VERSION, "train", image_hw=(45, 80))
    batch = u2mkd.collate_pairs([data[1], data[0]])
    first = len(data[1].scan.points)
    item = data[1]
    assert len(batch.splat.point) == len(item.sightings.point) + len(data[0].sightings.point)
    assert torch.equal(batch.splat.point[:len(item.sightings.point)], torch.from_numpy(item.sightings.point))
    assert (batch.splat.point[len(item.sightings.point):] >= first).all()
    assert (batch.splat.row[len(item.sightings.point):] >= len(item.images)).all()  # the second scan's images


# ------------------------------------------------------------------------------------
# 7. Sweeps
# ------------------------------------------------------------------------------------

def test_sweeps_around_a_keyframe(synth_nusc):
    tables = tables_of(synth_nusc)
    frames = nusc.keyframes(tables, synth_nusc, nusc.split_scenes(tables, "train"))
    middle = frames[1]
    tokens = nusc.sweep_tokens(tables, middle.lidar_token, 4)
    assert len(tokens) == 4 and not any(tables["sample_data"][t]["is_key_frame"] for t in tokens)
    stamps = [tables["sample_data"][t]["timestamp"] for t in tokens]
    key = tables["sample_data"][middle.lidar_token]["timestamp"]
    assert stamps[0] > stamps[1] and stamps[1] < key < stamps[2] < stamps[3]  # 2 before (nearest first), 2 after
    first = frames[0]  # no sweep before the scene's first keyframe: all four come after it
    assert all(tables["sample_data"][t]["timestamp"] > tables["sample_data"][first.lidar_token]["timestamp"]
               for t in nusc.sweep_tokens(tables, first.lidar_token, 4))
    sweeps = nusc.read_sweeps(tables, synth_nusc, middle.lidar_token, 4)
    assert sweeps.shape[1] == 4 and len(sweeps) > 3 * len(nusc.read_points(middle.points))
    # On the turned car, against an independent computation: each sweep's points moved by the
    # poses synthnusc built the scenes from (its Euler angles, not the tables' quaternions).
    def lidar_to_world(token):
        row = tables["sample_data"][token]
        m = np.eye(4)
        m[:3, :3] = synthnusc.ego_rotation(row["timestamp"]) @ synthnusc.LIDAR_AXES
        m[:3, 3] = tables["ego_pose"][row["ego_pose_token"]]["translation"] + \
            synthnusc.ego_rotation(row["timestamp"]) @ np.array(synthnusc.LIDAR_MOUNT)
        return m

    expected = []
    for token in tokens:
        pts = nusc.read_points(synth_nusc / tables["sample_data"][token]["filename"])
        near = (np.abs(pts[:, 0]) < 1) & (np.abs(pts[:, 1]) < 1)
        assert near.sum() >= synthnusc.EGO_RETURNS  # the car's roof: the filter has work to do
        m = np.linalg.inv(lidar_to_world(middle.lidar_token)) @ lidar_to_world(token)
        expected.append(pts[~near, :3].astype(np.float64) @ m[:3, :3].T + m[:3, 3])
    assert np.abs(sweeps[:, :3] - np.concatenate(expected)).max() < 1e-3


def test_a_sweep_is_moved_into_the_keyframes_lidar_frame(tmp_path):
    """A hand-made keyframe and sweep with different ego poses: the sweep's points must come out
    where an independent computation puts them, and its points within 1 m of its sensor go."""
    lidar_q, lidar_t = unit([0.70, 0.02, -0.01, -0.71]), np.array([0.9, 0.05, 1.8])
    ego_k_q, ego_k_t = unit([0.96, 0.0, 0.0, 0.28]), np.array([400.0, 1100.0, 0.0])
    ego_s_q, ego_s_t = unit([0.955, 0.0, 0.0, 0.297]), np.array([398.6, 1099.5, 0.0])  # 0.1 s earlier
    row = lambda q, t: {"rotation": list(q), "translation": list(t)}  # noqa: E731
    points = np.array([[10.0, -3.0, 0.5, 7, 1], [0.5, -0.4, 0.1, 9, 2], [-20.0, 40.0, -1.5, 3, 30]], dtype=np.float32)
    points.tofile(tmp_path / "sweep.pcd.bin")
    tables = nusc.Tables("hand-made", {
        "sample_data": {"K": {"ego_pose_token": "eK", "calibrated_sensor_token": "c", "prev": "S", "next": ""},
                        "S": {"ego_pose_token": "eS", "calibrated_sensor_token": "c", "prev": "", "next": "K",
                              "filename": "sweep.pcd.bin"}},
        "ego_pose": {"eK": row(ego_k_q, ego_k_t), "eS": row(ego_s_q, ego_s_t)},
        "calibrated_sensor": {"c": row(lidar_q, lidar_t)}})
    moved = nusc.read_sweeps(tables, tmp_path, "K", 2)
    inv = lambda q: q * np.array([1, -1, -1, -1])  # noqa: E731
    kept = points[[0, 2], :3].astype(np.float64)  # the second point is within 1 m of the sensor
    glob = rotate(ego_s_q, rotate(lidar_q, kept) + lidar_t) + ego_s_t
    expected = rotate(inv(lidar_q), rotate(inv(ego_k_q), glob - ego_k_t) - lidar_t)
    np.testing.assert_allclose(moved[:, :3], expected, atol=1e-4)
    assert moved[:, 3].tolist() == [7.0, 3.0] and np.abs(moved[:, :3] - kept).max() > 1  # intensity kept; it moved


# ------------------------------------------------------------------------------------
# 8. The dataset and prediction: points beyond the range
# ------------------------------------------------------------------------------------

def test_far_points_do_not_change_the_predictions_of_the_points_in_range(synth_nusc):
    import infer
    import u2mkd
    tables = tables_of(synth_nusc)
    frame = nusc.keyframes(tables, synth_nusc, nusc.split_scenes(tables, "val"))[0]
    points = nusc.read_points(frame.points)
    far = points[:300].copy()
    far[:, 0] += 70.0  # beyond the 50 m range: pushed onto its edge at inference
    far[:5, 0] = np.nan  # and non-finite ones, which nusc_points puts at 0
    more = np.concatenate([points, far])
    inside = scandata.in_range(points[:, :3], nusc.RANGE_MIN, nusc.RANGE_MAX)
    torch.manual_seed(0)
    student = elite.Student(elite.student_config("nuscenes")).eval()
    fusion = u2mkd.FusionStudent(elite.student_config("nuscenes")).eval()
    images = np.stack([u2mkd.prepare_full_image(nusc.read_camera_image(c), (45, 80)) for c in frame.cameras])
    for model, imgs in ((student, None), (fusion, images)):
        runs_ = [infer.predict_nusc_frame(model, p, imgs, nusc.camera_sightings(tables, frame, p[:, :3]), 2,
                                          np.random.default_rng(0), "cpu", "kf") for p in (points, more)]
        assert np.array_equal(runs_[0][inside], runs_[1][:len(points)][inside])
        assert runs_[1].min() >= 1 and runs_[1].max() <= 16


# ------------------------------------------------------------------------------------
# 9-10. Evaluation and submission
# ------------------------------------------------------------------------------------

def test_confusion_follows_the_devkit_rules():
    conf = nusc.LidarsegConfusion()
    gt = torch.tensor([4, 4, 4, 0, 0, 11, 11, 7])
    pred = torch.tensor([4, 4, 11, 4, 0, 11, 0, 3])
    conf.add(pred, gt)
    iou = conf.iou()  # classes 1..16
    assert iou[4 - 1] == pytest.approx(2 / 3)  # 2 hits, 1 missed (predicted 11); the ignored point's 4 is dropped
    assert iou[11 - 1] == pytest.approx(1 / 2)  # 1 hit, 1 false positive; the point predicted 0 is no miss
    assert iou[7 - 1] == 0 and iou[3 - 1] == 0  # a miss; a class predicted but absent from the ground truth
    assert iou[1 - 1].isnan()  # absent from both: left out of the mean
    assert conf.miou() == pytest.approx(np.mean([2 / 3, 1 / 2, 0, 0]))
    assert "n/a" in conf.table() and conf.present().tolist()[3] and not conf.present().tolist()[2]
    # The devkit's frequency-weighted IoU: (3 points x 2/3 + 1 x 1/2 + 1 x 0) / the 5 points its matrix keeps.
    assert conf.fw_iou() == pytest.approx((3 * 2 / 3 + 1 * 1 / 2 + 1 * 0) / 5)
    assert re.search(r"^fwIoU +50\.0", conf.table(), re.M)


def test_submission_labels_and_meta():
    out = nusc.submission_labels(np.array([3, 0, 16, 0]), fallback=np.array([9, 5, 9, 2]))
    assert out.dtype == np.uint8 and out.tolist() == [3, 5, 16, 2]  # 0 is not allowed in a submission
    assert nusc.submission_labels(np.array([0, 4])).tolist() == [1, 4]
    with pytest.raises(ValueError, match="1..16"):
        nusc.submission_labels(np.array([17]))
    assert nusc.submission_meta(True)["meta"] == {"use_camera": True, "use_lidar": True, "use_radar": False,
                                                  "use_map": False, "use_external": False}
