"""``hfcompress push`` and ``hfcompress card``: publish a compressed folder, render its model card."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import CliError, emit, info

PUSH_HELP = "upload a compressed folder (weights, config, tokenizer, card) to the Hugging Face Hub"
PUSH_DESCRIPTION = """\
Upload FOLDER (written by `hfcompress compress`) to the Hub repo REPO_ID, creating the repo if needed.
FOLDER is validated first (config, safetensors headers, compressed tensors), so a damaged checkpoint is
never uploaded. A card rendered by hfcompress is re-rendered for REPO_ID (load snippet, model-index
name; base model, license, evaluation and command are kept); a README.md written by hand is uploaded
as is unless --render-card; a missing one is rendered. The folder itself is not modified. The token comes from
--token, HF_TOKEN or `hf auth login`; the Hub from --endpoint or HF_ENDPOINT.

example:
  hfcompress push smollm2-int4 my-user/SmolLM2-135M-Instruct-hfc-int4 --private
"""

CARD_HELP = "render the model card (README.md) of a compressed folder"
CARD_DESCRIPTION = """\
Render the model card of FOLDER: metadata (base_model, base_model_relation: quantized, library_name,
tags, license, model-index from FOLDER/eval_results.json) and a body with the settings, bytes per layer
group, a load snippet and the evaluation. The folder's current README.md supplies base model, license and
reproduce command unless given. Prints the card, or writes it with --write (FOLDER/README.md) or -o FILE.
"""


def add_parsers(sub) -> None:
    p = sub.add_parser("push", help=PUSH_HELP, description=PUSH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="compressed checkpoint folder")
    p.add_argument("repo_id", help="Hub repo id, namespace/name")
    p.add_argument("--private", action="store_true", default=None, help="create the repo as private (ignored if it exists)")
    p.add_argument("--revision", help="branch to push to (created from main if missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--message", help="commit message (default: 'Upload compressed model (hfcompress)')")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    card = p.add_mutually_exclusive_group()
    card.add_argument("--render-card", action="store_true", help="render a fresh card even when FOLDER has a hand-written README.md")
    card.add_argument("--no-card", action="store_true", help="upload without README.md")
    p.add_argument("--base-model", help="Hub id of the dense model, for the card")
    p.add_argument("--license", help="license of the base model, for the card")
    p.set_defaults(func=run_push)

    c = sub.add_parser("card", help=CARD_HELP, description=CARD_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("folder", help="compressed checkpoint folder")
    out = c.add_mutually_exclusive_group()
    out.add_argument("--write", action="store_true", help="write FOLDER/README.md (atomically)")
    out.add_argument("-o", "--output", help="write the card to this file")
    c.add_argument("--base-model", help="Hub id of the dense model (default: from FOLDER/README.md)")
    c.add_argument("--license", help="license of the base model (default: from FOLDER/README.md)")
    c.add_argument("--repo-id", help="Hub repo the card is for (used in the load snippet)")
    c.add_argument("--eval-results", help="report.json to take the evaluation from (default: FOLDER/eval_results.json)")
    c.add_argument("--template", help="jinja2 template to render instead of the built-in one")
    c.add_argument("--tag", action="append", dest="tags", help="extra tag (repeatable)")
    c.set_defaults(func=run_card)


def _folder(path: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise CliError(f"{path} is not a folder; pass a folder written by `hfcompress compress`.")
    return folder


def run_push(args) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from ..hub import push_to_hub

    folder = _folder(args.folder)
    if args.token is not None and not args.token.strip():
        raise CliError("--token is empty; pass a Hub token (hf_...), or leave --token out to use HF_TOKEN or the saved login.")
    card = True if args.render_card else False if args.no_card else None
    info(args, f"uploading {folder} to {args.repo_id}")
    try:
        commit = push_to_hub(
            folder, args.repo_id, token=args.token, private=args.private, revision=args.revision,
            create_pr=args.create_pr, commit_message=args.message, endpoint=args.endpoint, card=card,
            base_model=args.base_model, license=args.license,
        )  # fmt: skip
    except HfHubHTTPError as exc:
        raise CliError(f"the Hub refused the upload: {str(exc).splitlines()[0]}", code=1) from None
    payload = {"repo_id": args.repo_id, "commit_url": commit.commit_url, "commit_oid": commit.oid, "pr_url": commit.pr_url}
    text = f"pushed {folder} to {args.repo_id}: {commit.commit_url}" + (f" (pull request {commit.pr_url})" if commit.pr_url else "")
    emit(args, payload, text)
    return 0


def run_card(args) -> int:
    from ..hub import model_card, save_card

    folder = _folder(args.folder)
    if args.eval_results and not Path(args.eval_results).is_file():
        raise CliError(f"--eval-results {args.eval_results} is not a file.")
    card = model_card(
        folder, base_model=args.base_model, license=args.license, repo_id=args.repo_id,
        eval_results=args.eval_results, template=args.template, tags=args.tags,
    )  # fmt: skip
    text = str(card)
    target = None
    if args.write:
        target = save_card(card, folder)
    elif args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
        target = out
    if args.json:
        emit(args, {"metadata": card.data.to_dict(), "path": str(target) if target else None, "card": text}, "")
    elif target is not None:
        emit(args, {}, f"wrote {target}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
