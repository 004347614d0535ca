"""Network checks of one bundle in one process (CI helper; standard library + MONAI + torch only).

    python ci/net_tools.py BUNDLE NET_ID WORK_DIR CONFIG [CONFIG ...] [--weights FILE] [--torchscript JSON]

1. ``monai.bundle.verify_net_in_out`` on ``NET_ID`` (the metadata's input shape, its channels/dtype).
2. Unless ``--torchscript '{"exempt": "..."}'``: ``monai.bundle.ckpt_export`` of ``--weights`` (default: the
   freshly initialised network's weights, saved to ``WORK_DIR/init_model.pt``) to ``WORK_DIR/model.ts``,
   then the eager network and ``torch.jit.load(model.ts)`` must give the same output (atol 1e-4) on the
   same random input. ``{"use_trace": true, "input_shape": [...]}`` exports by tracing.

Prints ``NET-IN-OUT-OK`` / ``TORCHSCRIPT-OK ...`` / ``TORCHSCRIPT-EXEMPT reason`` markers; exit 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path


def _input_shape(parser) -> tuple[int, ...]:
    fmt = parser.get("_meta_#network_data_format#inputs#image")
    shape = []
    for dim in fmt["spatial_shape"]:
        if isinstance(dim, int):
            shape.append(dim)
        elif dim == "*":
            shape.append(16)
        else:  # "16*n", "2**p", "n": the smallest legal size (n = p = 1, as verify_net_in_out's defaults)
            shape.append(int(eval(str(dim), {"__builtins__": {}}, {"n": 1, "p": 1})))  # noqa: S307 - metadata arithmetic only
    return (1, int(fmt["num_channels"]), *shape)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("net_id")
    ap.add_argument("work_dir")
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--torchscript", default="{}")
    args = ap.parse_args(argv)
    if os.environ.get("NPC_GTV_HIDE_REPO"):  # check a package as if this repository were not installed
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bundle_deps

        bundle_deps.hide_installed_project()
        sys.path.pop(0)

    import torch
    from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

    bundle = Path(args.bundle).resolve()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(bundle))
    configs = [str(bundle / c) for c in args.configs]
    meta_file = str(bundle / "configs" / "metadata.json")
    config_arg = configs if len(configs) > 1 else configs[0]
    rule = json.loads(args.torchscript)
    ok = True
    try:
        verify_net_in_out(net_id=args.net_id, meta_file=meta_file, config_file=config_arg, device="cpu",
                          bundle_root=str(bundle))
        print("NET-IN-OUT-OK", flush=True)
    except Exception:  # report and go on with the export check
        traceback.print_exc()
        print("NET-IN-OUT-FAIL", flush=True)
        ok = False

    if rule.get("exempt"):
        print(f"TORCHSCRIPT-EXEMPT {rule['exempt']}", flush=True)
        return 0 if ok else 1
    try:
        torch.manual_seed(0)
        parser = ConfigParser()
        parser.read_config(configs)
        parser.read_meta(meta_file)
        parser["bundle_root"] = str(bundle)
        net = parser.get_parsed_content(args.net_id)
        weights = args.weights
        if not weights or not Path(weights).is_file():
            weights = str(work / "init_model.pt")
            torch.save(net.state_dict(), weights)
        ts_file = work / "model.ts"
        kwargs = {}
        if rule.get("use_trace"):
            kwargs["use_trace"] = True
            kwargs["input_shape"] = rule.get("input_shape") or list(_input_shape(parser))
        ckpt_export(net_id=args.net_id, filepath=str(ts_file), ckpt_file=weights, meta_file=meta_file,
                    config_file=config_arg, bundle_root=str(bundle), **kwargs)
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        net.eval()
        scripted = torch.jit.load(str(ts_file), map_location="cpu")
        scripted.eval()
        x = torch.rand(*_input_shape(parser))
        with torch.no_grad():
            a, b = net(x), scripted(x)
        a = a if isinstance(a, torch.Tensor) else a[0]
        b = b if isinstance(b, torch.Tensor) else b[0]
        diff = float((a - b).abs().max())
        same = a.shape == b.shape and diff <= 1e-4
        print(f"TORCHSCRIPT-{'OK' if same else 'MISMATCH'} input={tuple(x.shape)} output={tuple(a.shape)} "
              f"max_abs_diff={diff:.3g} weights={Path(weights).name}", flush=True)
        ok = ok and same
    except Exception:
        traceback.print_exc()
        print("TORCHSCRIPT-FAIL", flush=True)
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
