"""example_workflows/*.json: sound graphs in the frontend's workflow format whose vramguard nodes
match the pack (input names, widget values, outputs).  tests/test_comfyui_real.py checks every
node type against a real ComfyUI's /object_info and runs each workflow there."""
import pytest

from workflow_api import EXAMPLES, UI_ONLY, load, object_info_of, structure_errors, to_prompt

FILES = sorted(EXAMPLES.glob("*.json"))


def test_the_four_examples_exist():
    names = {p.stem for p in FILES}
    assert names >= {"tiled_upscale_vs_core", "tiled_vae_decode", "gc_checkpoints_memory_timeline", "set_reserve"}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_workflow_is_sound_and_matches_the_pack(path):
    from vramguard_nodes import NODE_CLASS_MAPPINGS

    wf = load(path)
    assert wf.get("version") == 0.4 and wf["nodes"] and wf["links"]
    assert structure_errors(wf) == []
    ours = [n for n in wf["nodes"] if n["type"].startswith("Vramguard")]
    assert ours, "an example without a vramguard node"
    info = object_info_of(NODE_CLASS_MAPPINGS)
    for n in ours:
        assert n["type"] in NODE_CLASS_MAPPINGS, n["type"]
        cls = NODE_CLASS_MAPPINGS[n["type"]]
        spec = cls.INPUT_TYPES()
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        for i in n["inputs"]:
            assert i["name"] in declared, (n["type"], i["name"])
        widgets = [k for k, v in declared.items() if isinstance(v[0], list) or v[0] in ("INT", "FLOAT", "STRING",
                                                                                        "BOOLEAN")]
        assert len(n["widgets_values"]) == len(widgets), (n["type"], n["widgets_values"], widgets)
        for k, v in zip(widgets, n["widgets_values"]):
            t = declared[k][0]
            if isinstance(t, list):
                assert v in t, (n["type"], k, v)
            else:
                assert isinstance(v, {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[t]), (k, v)
        assert [o["type"] for o in n["outputs"]] == list(cls.RETURN_TYPES)
    # our nodes convert to the API prompt with every required input present
    prompt = to_prompt({**wf, "nodes": ours}, info)
    for nid, node in prompt.items():
        required = NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()["required"]
        assert set(required) <= set(node["inputs"]), (node["class_type"], set(required) - set(node["inputs"]))
    assert all(n["type"] in UI_ONLY or "properties" in n for n in wf["nodes"])
