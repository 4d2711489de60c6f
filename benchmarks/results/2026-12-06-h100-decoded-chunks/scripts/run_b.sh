source .dev/common.sh
old; job job_warm_old_2 130
new; job job_warm_new_2 130
old; job job_warm_old_3 130
new; job job_warm_new_3 130
new
