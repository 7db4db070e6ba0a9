"""ComfyUI frontend workflows (the UI graph JSON) for the tests: structure checks and the
conversion to an API prompt, the way the frontend's "Queue" builds one (widgets_values in the
order of the node's widget inputs, a seed's control_after_generate value skipped)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "example_workflows"
UI_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
CONTROL = {"fixed", "increment", "decrement", "randomize"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def structure_errors(wf: dict) -> list[str]:
    """Inconsistencies between nodes and links (empty when the graph is sound)."""
    errs = []
    nodes = {n["id"]: n for n in wf["nodes"]}
    if len(nodes) != len(wf["nodes"]):
        errs.append("duplicate node ids")
    links = {}
    for link in wf["links"]:
        lid, src, sslot, dst, dslot, typ = link
        if lid in links:
            errs.append(f"duplicate link id {lid}")
        links[lid] = link
        if src not in nodes or dst not in nodes:
            errs.append(f"link {lid} joins a missing node")
            continue
        outs, ins = nodes[src]["outputs"], nodes[dst]["inputs"]
        if sslot >= len(outs) or lid not in (outs[sslot].get("links") or []):
            errs.append(f"link {lid}: output {sslot} of node {src} does not list it")
        if dslot >= len(ins) or ins[dslot].get("link") != lid:
            errs.append(f"link {lid}: input {dslot} of node {dst} does not hold it")
        elif typ != outs[sslot]["type"]:
            errs.append(f"link {lid}: type {typ} but the output is {outs[sslot]['type']}")
        elif ins[dslot]["type"] not in ("*", typ) and typ != "*":
            errs.append(f"link {lid}: {typ} into a {ins[dslot]['type']} input")
    for n in wf["nodes"]:
        for i in n.get("inputs", []):
            if i.get("link") is not None and i["link"] not in links:
                errs.append(f"node {n['id']} input {i['name']}: link {i['link']} does not exist")
        for o in n.get("outputs", []):
            for lid in o.get("links") or []:
                if lid not in links or links[lid][1] != n["id"]:
                    errs.append(f"node {n['id']} output {o['name']}: link {lid} is not from it")
    if wf.get("last_node_id", 0) < max(nodes, default=0) or wf.get("last_link_id", 0) < max(links, default=0):
        errs.append("last_node_id / last_link_id below the ids used")
    return errs


def _widget_inputs(spec: dict) -> list[tuple[str, Any, dict]]:
    out = []
    for section in ("required", "optional"):
        for name, sp in (spec.get(section) or {}).items():
            t = sp[0]
            opts = sp[1] if len(sp) > 1 and isinstance(sp[1], dict) else {}
            if isinstance(t, list) or t in WIDGET_TYPES:
                out.append((name, t, opts))
    return out


def to_prompt(wf: dict, object_info: dict) -> dict:
    """The API prompt ({id: {class_type, inputs}}) of a UI workflow, given /object_info."""
    links = {link[0]: link for link in wf["links"]}
    prompt = {}
    for n in wf["nodes"]:
        if n["type"] in UI_ONLY or n.get("mode", 0) in (2, 4):  # notes; muted / bypassed nodes
            continue
        linked = {i["name"]: links[i["link"]] for i in n.get("inputs", []) if i.get("link") is not None}
        inputs: dict[str, Any] = {name: [str(lk[1]), lk[2]] for name, lk in linked.items()}
        vals = list(n.get("widgets_values") or [])
        k = 0
        for name, _t, opts in _widget_inputs(object_info[n["type"]]["input"]):
            if name in linked or k >= len(vals):
                continue
            inputs[name] = vals[k]
            k += 1
            if (opts.get("control_after_generate") or name in ("seed", "noise_seed")) and k < len(vals) \
                    and vals[k] in CONTROL:
                k += 1
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


def object_info_of(mappings: dict) -> dict:
    """/object_info's input part for node classes (our pack's, without ComfyUI)."""
    return {k: {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES)} for k, cls in mappings.items()}
