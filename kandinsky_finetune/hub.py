"""--push_to_hub: upload the final output_dir to the Hugging Face Hub, without checkpoints, logs or
validation images."""
import os


def upload(args, log):
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="Fine-tuned Kandinsky 2.2",
                      ignore_patterns=["checkpoint-*", ".tmp-*", f"{args.logging_dir}/*", "validation/*"])
    log(f"uploaded {args.output_dir} to https://huggingface.co/{repo_id}")
