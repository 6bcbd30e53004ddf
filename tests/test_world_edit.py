"""Scene-graph edits (cheetah/world/edit.py): what each edit type does, and `edit_scene`'s visible random edits."""

import numpy as np
import pytest

from cheetah.world import EDIT_TYPES, apply_edit, edit_scene, generate_scene, render

SCENES = [generate_scene(7, i) for i in range(60)]


def _by_name(scene):
    return {o.name: o for o in scene.objects}


@pytest.mark.parametrize("edit_type", ["modify", "swap", "delete"])
def test_an_edit_changes_its_target_only(edit_type):
    for i, scene in enumerate(SCENES):
        target = scene.objects[i % len(scene.objects)]
        edited, before, after = apply_edit(scene, edit_type, np.random.default_rng(i), target=target)
        assert before == target
        others = {n: o for n, o in _by_name(scene).items() if n != target.name}
        assert {n: o for n, o in _by_name(edited).items() if n != target.name} == others
        if edit_type == "delete":
            assert after is None and target.name not in _by_name(edited)
            continue
        assert _by_name(edited)[target.name] == after
        assert (after.size, after.cell, after.box) == (target.size, target.cell, target.box)
        assert after.color != scene.background_color
        changed = {k for k in ("shape", "color", "texture") if getattr(after, k) != getattr(target, k)}
        if edit_type == "modify":
            assert len(changed) == 1
        else:  # another kind of object: new shape and colour
            assert {"shape", "color"} <= changed


def test_add_puts_a_new_object_of_the_size_in_the_empty_cell():
    for i, scene in enumerate(SCENES):
        cell = scene.empty_cells()[0]
        for size in ("small", "large"):
            edited, before, after = apply_edit(scene, "add", np.random.default_rng(i), cell=cell, size=size)
            assert before is None and edited.objects[:-1] == scene.objects and edited.objects[-1] == after
            assert (after.cell, after.size) == (cell, size) and after.name not in _by_name(scene)
            assert after.color != scene.background_color


def test_apply_edit_refuses_an_occupied_cell_and_unknown_types():
    scene = SCENES[0]
    with pytest.raises(ValueError, match="not empty"):
        apply_edit(scene, "add", np.random.default_rng(0), cell=scene.objects[0].cell)
    with pytest.raises(ValueError, match="unknown edit type"):
        apply_edit(scene, "recolor", np.random.default_rng(0), target=scene.objects[0])


@pytest.mark.parametrize("size", ["small", "large"])
def test_edit_scene_is_a_visible_edit_of_an_object_of_its_size(size):
    kinds = set()
    for i, scene in enumerate(SCENES):
        edited, sentence = edit_scene(scene, np.random.default_rng(i), size=size)
        assert edit_scene(scene, np.random.default_rng(i), size=size) == (edited, sentence)  # deterministic
        assert not np.array_equal(np.asarray(render(scene).image), np.asarray(render(edited).image))
        kind = edited.id.rpartition("+")[2]
        kinds.add(kind)
        old, new = _by_name(scene), _by_name(edited)
        touched = [old.get(n) or new.get(n) for n in old.keys() ^ new.keys()] or \
                  [o for n, o in old.items() if new.get(n) != o]
        assert len(touched) == 1 and touched[0].size == size and f" {size} " in f" {sentence} "
        if size == "large":  # what a caption names: one or two large objects, before and after
            assert 1 <= len(edited.primary) <= 2
    assert kinds == set(EDIT_TYPES)
