#!/bin/sh
# One-shot, as MinIO's root (the `buckets` service of infra/docker-compose.yml): the two buckets, a
# policy per bucket, and one user per service holding only its bucket's policy, so that no service
# but MinIO itself and this script knows the root keys:
#   the worker (DVC's remote)          WORKER_S3_ACCESS_KEY / WORKER_S3_SECRET_KEY  -> DVC_BUCKET
#   the MLflow server (its artifacts)  MLFLOW_S3_ACCESS_KEY / MLFLOW_S3_SECRET_KEY  -> MLFLOW_BUCKET
# Every step is idempotent: a restart with changed keys in infra/.env rotates them.
set -eu
for name in MINIO_ROOT_USER MINIO_ROOT_PASSWORD WORKER_S3_ACCESS_KEY WORKER_S3_SECRET_KEY \
            MLFLOW_S3_ACCESS_KEY MLFLOW_S3_SECRET_KEY MLFLOW_BUCKET DVC_BUCKET; do
  eval "value=\${$name:-}"
  case "$value" in
    "" | *CHANGE_ME*) echo "minio-init: set $name in infra/.env (empty or CHANGE_ME is refused)" >&2; exit 1 ;;
  esac
done
if [ "$WORKER_S3_ACCESS_KEY" = "$MINIO_ROOT_USER" ] || [ "$MLFLOW_S3_ACCESS_KEY" = "$MINIO_ROOT_USER" ] \
   || [ "$WORKER_S3_ACCESS_KEY" = "$MLFLOW_S3_ACCESS_KEY" ]; then
  echo "minio-init: the worker, the MLflow server and the root need three different access keys" >&2
  exit 1
fi

mc alias set stack http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "stack/$MLFLOW_BUCKET" "stack/$DVC_BUCKET"

# Read, write and delete objects of one bucket, list it, multipart uploads; nothing else.
bucket_user() {  # policy-name bucket access-key secret-key
  policy=/tmp/$1.json
  cat > "$policy" <<JSON
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow",
     "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
     "Resource": ["arn:aws:s3:::$2"]},
    {"Effect": "Allow",
     "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::$2/*"]}
  ]
}
JSON
  mc admin policy create stack "$1" "$policy"
  mc admin user add stack "$3" "$4"
  # Attaching a policy the user already has is refused with "already in effect": that is success here.
  if ! out=$(mc admin policy attach stack "$1" --user "$3" 2>&1); then
    case "$out" in
      *"already in effect"*) ;;
      *) echo "$out" >&2; exit 1 ;;
    esac
  fi
  echo "minio-init: $3 may use bucket $2 (policy $1)"
}
bucket_user grpo-dvc "$DVC_BUCKET" "$WORKER_S3_ACCESS_KEY" "$WORKER_S3_SECRET_KEY"
bucket_user grpo-mlflow-artifacts "$MLFLOW_BUCKET" "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY"
