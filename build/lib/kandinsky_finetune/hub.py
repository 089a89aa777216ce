"""--push_to_hub: upload the final output_dir to the Hugging Face Hub, without checkpoints, logs or
validation images."""
import os

from .params import UsageError


def _repo(args):
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    return api, api.create_repo(repo_id, exist_ok=True).repo_id


def check_access(args):
    """Before training: create (or find) the repo, so a missing token or network fails now, not after the run."""
    try:
        _repo(args)
    except Exception as e:  # network, auth and hub errors alike end the run before it starts
        reason = (str(e).strip().splitlines() or [""])[0]
        raise UsageError(f"--push_to_hub: cannot create or reach the Hugging Face repo: {type(e).__name__}: {reason}") \
            from None


def upload(args, log):
    api, repo_id = _repo(args)
    api.upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="Fine-tuned Kandinsky 2.2",
                      ignore_patterns=["checkpoint-*", ".tmp-*", f"{args.logging_dir}/*", "validation/*"])
    log(f"uploaded {args.output_dir} to https://huggingface.co/{repo_id}")
