"""Sharing the final output_dir on a hub: --push_to_hub (Hugging Face Hub) and --save_to_aistudio (AI Studio), each
repo created or checked before training; then the model, its card and validation grid, never checkpoints, logs,
unfinished (.tmp-*) or validation folders."""
import contextlib
import io
import os

from .faults import RunError, first_line
from .params import UsageError

LICENSE_AISTUDIO = "Apache License 2.0"  # AI Studio's name for the card's apache-2.0 (Kandinsky 2.2's license)


class HuggingFace:
    flag, place = "--push_to_hub", "the Hugging Face repo"

    def __init__(self, args):
        from huggingface_hub import HfApi, get_token

        if not (args.hub_token or get_token()):
            raise UsageError("--push_to_hub: no Hugging Face token: pass --hub_token, run `huggingface-cli login` or "
                             "set HF_TOKEN")
        self.api = HfApi(token=args.hub_token)
        self.repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))

    def check(self):
        """Create the repo (or find the user's own): its full id, user/name."""
        self.repo_id = self.api.create_repo(self.repo_id, exist_ok=True).repo_id
        return self.repo_id

    def upload(self, folder, files):
        from huggingface_hub import CommitOperationAdd

        self.api.create_commit(self.repo_id, commit_message="Fine-tuned Kandinsky 2.2", operations=[
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name)) for name in files])
        return f"https://huggingface.co/{self.repo_id}"


class AIStudio:
    """aistudio-sdk reports failures as a returned {"error_code", "error_msg"} dict (network errors still raise)."""

    flag, place = "--save_to_aistudio", "the AI Studio repo"
    EXISTS, NO_TOKEN = 10003, 10002  # aistudio_sdk.constant.err_code.ErrorEnum: REPO_ALREADY_EXIST, TOKEN_IS_EMPTY

    def __init__(self, args):
        self.repo_id = args.aistudio_repo_id
        self.private = getattr(args, "aistudio_repo_private", None) is not False  # private unless asked (PaddleNLP)
        self.token = {"token": args.aistudio_token} if args.aistudio_token else {}

    def check(self):
        from aistudio_sdk import hub

        # AI Studio creates the repo under the token's user: the id's user part is not sent, and aistudio-sdk 0.2.6 has
        # no call that names the token's user, so the check is on the name the new repo gets back
        result = hub.create_repo(repo_id=self.repo_id, license=LICENSE_AISTUDIO, private=self.private, **self.token)
        code = result.get("error_code")
        if code == self.NO_TOKEN:
            raise UsageError("--save_to_aistudio: no AI Studio token: pass --aistudio_token, set AISTUDIO_ACCESS_TOKEN "
                             "or save one with `aistudio config -t <token>`")
        if code is not None and code != self.EXISTS:
            raise RuntimeError(f"AI Studio error {code}: {result.get('error_msg')}")
        user, created = self.repo_id.split("/")[0], str(result.get("repo_id") or "")
        if "/" in created and created.split("/")[0] != user:
            raise UsageError(f"--aistudio_repo_id {self.repo_id}: the token is {created.split('/')[0]}'s, and AI Studio "
                             f"creates repos under the token's user (it made {created}): pass {user}'s token, or "
                             f"--aistudio_repo_id {created}")
        return self.repo_id

    def upload(self, folder, files):
        from aistudio_sdk import hub

        for name in files:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints a progress line per step of each file
                result = hub.upload(repo_id=self.repo_id, path_or_fileobj=os.path.join(folder, name), path_in_repo=name,
                                    commit_message="Fine-tuned Kandinsky 2.2", **self.token)
            if "error_code" in result:
                raise RuntimeError(f"{name}: AI Studio error {result['error_code']}: {result.get('error_msg')}")
        return f"AI Studio repo {self.repo_id}"


def _hubs(args):
    return [hub for wanted, hub in ((args.push_to_hub, HuggingFace), (args.save_to_aistudio, AIStudio)) if wanted]


def check_access(args):
    """Before training: create (or find) each repo, so a missing token, no network or a name the hub rejects fails
    now, with one line, not after the run."""
    for hub in _hubs(args):
        try:
            hub(args).check()
        except UsageError:
            raise
        except Exception as e:  # network, auth and hub errors alike end the run before it starts
            raise UsageError(f"{hub.flag}: cannot create or reach {hub.place}: {first_line(e)}") from None


def files_to_upload(output_dir, logging_dir):
    """What a hub gets of output_dir, as sorted paths relative to it: all but checkpoint-*, .tmp-* (unfinished work),
    the logging dir (and logs/, where the README puts the launcher's logs) and validation/ (the card's grid is
    beside the card)."""
    skipped = {"validation", "logs", os.path.normpath(logging_dir)}

    def kept(path):
        top = path.split(os.sep)[0]
        return not (top.startswith(("checkpoint-", ".tmp-")) or any(path == s or path.startswith(s + os.sep)
                                                                   for s in skipped))

    found = []
    for root, folders, files in os.walk(output_dir):
        here = os.path.relpath(root, output_dir)
        folders[:] = [f for f in folders if kept(os.path.normpath(os.path.join(here, f)))]
        found += [path for path in (os.path.normpath(os.path.join(here, f)) for f in files) if kept(path)]
    return sorted(found)


def upload(args, log):
    """After the final save: output_dir's files_to_upload to each hub asked for. A failure is one line; the output
    stays complete on disk."""
    files = files_to_upload(args.output_dir, args.logging_dir)
    size = sum(os.path.getsize(os.path.join(args.output_dir, f)) for f in files)
    for hub in _hubs(args):
        try:
            target = hub(args)
            target.check()
            where = target.upload(args.output_dir, files)
        except Exception as e:
            raise RunError(f"{hub.flag}: the upload failed ({first_line(e)}); {args.output_dir} "
                           "is saved and complete") from None
        log(f"uploaded {len(files)} files ({size / 1e6:.1f} MB) of {args.output_dir} to {where}")
