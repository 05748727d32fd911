"""Reference side of the `openpose` / `openpose_full` benchmark: controlnet_aux 0.0.10's
`OpenposeDetector` as a user calls it (HWC3, resize_image to the detect resolution, the body
network and its grouping; for openpose_full also the hand boxes with the 4-scale hand network
and the face box with the face network; the skeleton drawing), float32 on the CPU, with the
formula weights the Rust side uses (tools/parity/neural/formula.py), filled by each FILE's key
names: `body_pose_model.pth` and `hand_pose_model.pth` hold the layer names without the
module prefix (`conv1_1.weight`; `util.transfer` maps them), `facenet.pth` the model's own keys.

Formula weights find "people" in any photo (17 on the parity fixture's 144x192 image), so
openpose_full also runs the hand and face networks for each of them, as the reference would.

detectors() -> {"openpose" | "openpose_full": callable(img_rgb_uint8, resolution) -> hint
                (H, W, 3) uint8}

Standalone: neural_openpose.py IMAGE.png [--resolution 512] [--iters 3]  (one JSON line each)
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity", "neural"))

import torch  # noqa: E402

import formula  # noqa: E402


def _transferred(model):
    """`model` loaded as Body/Hand load their files: formula values under the file's keys (the
    model's keys minus their first component), mapped back by `util.transfer`."""
    from controlnet_aux.open_pose import util

    file = {k.split(".", 1)[1]: torch.from_numpy(formula.values(k.split(".", 1)[1], t.shape))
            for k, t in model.state_dict().items()}
    model.load_state_dict(util.transfer(model, file))
    return model.eval()


def build():
    """OpenposeDetector(Body, Hand, Face) on formula weights, without reading any file."""
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body
    from controlnet_aux.open_pose.face import Face, FaceNet, params
    from controlnet_aux.open_pose.hand import Hand
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model

    body = Body.__new__(Body)
    body.model = _transferred(bodypose_model())
    hand = Hand.__new__(Hand)
    hand.model = _transferred(handpose_model())
    # Face.__init__ reads its file; set what it sets (its defaults from face.params).
    face = Face.__new__(Face)
    face.inference_size = params["inference_img_size"]
    face.sigma = params["gaussian_sigma"]
    face.threshold = params["heatmap_peak_thresh"]
    face.model = formula.fill(FaceNet()).eval()
    return OpenposeDetector(body, hand, face)


def detectors():
    det = build()

    def openpose(img, res):
        return det(img, detect_resolution=res, image_resolution=res, include_body=True,
                   include_hand=False, include_face=False, output_type="np")

    def openpose_full(img, res):
        return det(img, detect_resolution=res, image_resolution=res, include_body=True,
                   include_hand=True, include_face=True, output_type="np")

    return {"openpose": openpose, "openpose_full": openpose_full}
