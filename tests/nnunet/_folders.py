"""Small nnU-Net v2 trained-model folders written by the tests (random weights, tiny plans)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": [1, 1],
        "n_conv_per_stage_decoder": [1], "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}

#: Intensity statistics of the (imaginary) training set, as nnU-Net's fingerprint records them.
INTENSITY = {"max": 2000.0, "mean": 60.0, "median": 40.0, "min": -1024.0, "percentile_00_5": -900.0,
             "percentile_99_5": 800.0, "std": 250.0}


def plans(*, patch_size=(16, 12, 8), spacing=(3.0, 2.0, 2.5), transpose=(0, 2, 1), name="Dataset999_Tiny",
          reader="NibabelIO") -> dict:
    back = [int(i) for i in np.argsort(transpose)]
    resampling = {"resampling_fn_data": "resample_data_or_seg_to_shape",
                  "resampling_fn_seg": "resample_data_or_seg_to_shape",
                  "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                  "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                  "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                  "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                         "force_separate_z": None}}
    return {
        "dataset_name": name, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing), "original_median_shape_after_transp": [20, 20, 20],
        "image_reader_writer": reader, "transpose_forward": list(transpose), "transpose_backward": back,
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": list(patch_size), "median_image_size_in_voxels": [20, 20, 20], "spacing": list(spacing),
            "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False], **resampling,
            "architecture": ARCH, "batch_dice": True,
        }},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": INTENSITY},
    }


def write_folder(root: Path, labels: dict[str, int], *, folds=(0,), mirror_axes=(0, 1, 2), seed=0,
                 trainer="nnUNetTrainer", extra_checkpoint: dict | None = None, **plan_kwargs) -> Path:
    """A trained-model folder as nnUNetv2_train leaves it, with random weights saved like nnU-Net's trainer."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    root.mkdir(parents=True, exist_ok=True)
    p = plans(**plan_kwargs)
    ds = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}
    (root / "plans.json").write_text(json.dumps(p))
    (root / "dataset.json").write_text(json.dumps(ds))
    for i, fold in enumerate(folds):
        torch.manual_seed(seed + i)
        net = get_network_from_plans(ARCH["network_class_name"], ARCH["arch_kwargs"], ARCH["_kw_requires_import"],
                                     1, len(labels), allow_init=True, deep_supervision=True)
        with torch.no_grad():  # move the norm layers off the identity so every weight matters
            for m in net.modules():
                if isinstance(m, torch.nn.InstanceNorm3d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        checkpoint = {
            "network_weights": net.state_dict(),
            "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.99, "params": [0]}]},
            "grad_scaler_state": None,
            "logging": {"train_losses": [np.float64(0.5)], "mean_fg_dice": [np.float32(0.1)],
                        "dice_per_class_or_region": [[np.float64(0.1)] * (len(labels) - 1)]},
            "_best_ema": np.float64(0.1), "current_epoch": 1,
            "init_args": {"plans": p, "configuration": "3d_fullres", "fold": fold, "dataset_json": ds,
                          "device": torch.device("cpu")},
            "trainer_name": trainer,
            "inference_allowed_mirroring_axes": tuple(mirror_axes) if mirror_axes is not None else None,
            **(extra_checkpoint or {}),
        }
        (root / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(checkpoint, root / f"fold_{fold}" / "checkpoint_final.pth")
    return root
