"""MJCF models of the custom TD-MPC2 tasks, derived from dm_control's stock model files.

The official tasks ship edited copies of the stock XML; we apply the same edits programmatically so that only
the differences live here.
"""
import functools
import xml.etree.ElementTree as ET

from dm_control.suite import cheetah, reacher, walker

_THREE_LINK = 0.09  # length of each of the three reacher links (stock two-link arm: 0.12)
_THREE_LINK_JOINT_RANGE = "-80 80"  # degrees, for shoulder1 and wrist (stock wrist: +-160)


def _edit(get_model_and_assets, edit):
    xml, assets = get_model_and_assets()
    root = ET.fromstring(xml)
    edit(root)
    return ET.tostring(root), assets


def _double_plane_length(root, name):
    # The official custom tasks make the floor plane twice as long (same position). MuJoCo collides with a
    # plane as if it were unbounded, so this changes only what is rendered; kept to match the official model.
    plane = root.find(f"./worldbody/geom[@name='{name}']")
    size = plane.get("size").split()
    size[0] = repr(2 * float(size[0]))
    plane.set("size", " ".join(size))


@functools.cache
def walker_long_floor():
    """Stock walker with the floor plane of half-length 500 instead of 250."""
    return _edit(walker.get_model_and_assets, lambda root: _double_plane_length(root, "floor"))


@functools.cache
def cheetah_long_ground():
    """Stock cheetah with the ground plane of half-length 200 instead of 100."""
    return _edit(cheetah.get_model_and_assets, lambda root: _double_plane_length(root, "ground"))


def _capsule(parent, name, length):
    return ET.SubElement(parent, "geom", name=name, type="capsule", fromto=f"0 0 0 {length} 0 0", size=".01",
                         material="self")


def _three_links(root):
    """arm(shoulder)-hand(wrist)-finger becomes arm0(shoulder0)-arm1(shoulder1)-hand(wrist)-finger."""
    arm0 = root.find("./worldbody/body[@name='arm']")
    arm0.set("name", "arm0")
    arm0.find("geom[@name='arm']").attrib.update(name="arm0", fromto=f"0 0 0 {_THREE_LINK} 0 0")
    arm0.find("joint[@name='shoulder']").set("name", "shoulder0")
    hand = arm0.find("body[@name='hand']")
    arm0.remove(hand)

    arm1 = ET.SubElement(arm0, "body", name="arm1", pos=f"{_THREE_LINK} 0 0")
    _capsule(arm1, "arm1", _THREE_LINK)
    ET.SubElement(arm1, "joint", name="shoulder1", limited="true", range=_THREE_LINK_JOINT_RANGE)
    arm1.append(hand)
    # The hand capsule keeps its stock geometry (length 0.1); only the joint and the finger move.
    hand.set("pos", f"{_THREE_LINK} 0 0")
    hand.find("joint[@name='wrist']").set("range", _THREE_LINK_JOINT_RANGE)
    hand.find("body[@name='finger']").set("pos", f"{_THREE_LINK} 0 0")

    actuator = root.find("actuator")
    for motor in list(actuator):
        actuator.remove(motor)
    for joint in ("shoulder0", "shoulder1", "wrist"):
        ET.SubElement(actuator, "motor", name=joint, joint=joint)


@functools.cache
def reacher_three_links():
    """Stock reacher arena with a three-link arm: links of 0.09, shoulder1 and wrist limited to +-80 deg."""
    return _edit(reacher.get_model_and_assets, _three_links)
