"""--push_to_hub: upload the final output_dir to the Hugging Face Hub, without checkpoints or logs."""
import os


def upload(output_dir, repo_id, token, log):
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = repo_id or os.path.basename(os.path.abspath(output_dir))
    repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message="Fine-tuned Kandinsky 2.2",
                      ignore_patterns=["checkpoint-*", ".tmp-*", "logs/*", "validation/*"])
    log(f"uploaded {output_dir} to https://huggingface.co/{repo_id}")
