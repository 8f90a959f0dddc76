<?php
/**
 * Plugin Name:       SalesTrainer Sidecar
 * Description:       Publishes signed transcription jobs to the sidecar's SQS queue and stores the transcripts the sidecar posts back (Tools → Transcription jobs).
 * Version:           1.0.0
 * Requires at least: 6.1
 * Requires PHP:      8.1
 * Author:            SalesTrainer
 * License:           Proprietary
 * Text Domain:       salestrainer-sidecar
 *
 * WordPress's half of docs/contract.md: salestrainer_sidecar_enqueue() signs and sends a job,
 * POST /wp-json/salestrainer/v1/upload-complete takes the callback, and the job table (one row
 * per job_id) is what both write. Configuration is by wp-config constants (readme.txt).
 *
 * @package SalesTrainer_Sidecar
 */

defined( 'ABSPATH' ) || exit;

define( 'SALESTRAINER_SIDECAR_VERSION', '1.0.0' );
define( 'SALESTRAINER_SIDECAR_FILE', __FILE__ );

require_once __DIR__ . '/includes/class-st-sidecar-config.php';
require_once __DIR__ . '/includes/class-st-sidecar-job-store.php';
require_once __DIR__ . '/includes/class-st-sidecar-publisher.php';
require_once __DIR__ . '/includes/class-st-sidecar-unconfigured-publisher.php';
require_once __DIR__ . '/includes/class-st-sidecar-callback-route.php';
require_once __DIR__ . '/includes/class-st-sidecar-admin-page.php';

register_activation_hook( __FILE__, array( 'ST_Sidecar_Job_Store', 'install' ) );
add_action( 'plugins_loaded', array( 'ST_Sidecar_Job_Store', 'maybe_upgrade' ) );
add_action( 'rest_api_init', array( 'ST_Sidecar_Callback_Route', 'register' ) );
// After core's own checks (application passwords add theirs at 90, cookies at 100).
add_filter( 'rest_authentication_errors', array( 'ST_Sidecar_Callback_Route', 'ignore_authorization' ), 1000 );
add_action( 'admin_menu', array( 'ST_Sidecar_Admin_Page', 'register' ) );

/**
 * Sign a transcription job and send it to the sidecar's SQS queue.
 *
 * @param string     $s3_key   Key of the uploaded recording.
 * @param string|int $job_id   Your id for the job (1-128 of A-Z a-z 0-9 . _ : -); the callback echoes it.
 * @param array      $metadata Associative array echoed back verbatim in the callback (e.g. post_id).
 * @param string     $language ISO-639-1 code or a WordPress locale such as de_DE; a hint for the model.
 * @param array      $options  Optional 'prompt' (vocabulary) and 's3_bucket' (default: the sidecar's S3_BUCKET).
 * @return string|WP_Error The SQS MessageId, or why the job was not sent.
 */
function salestrainer_sidecar_enqueue( $s3_key, $job_id, $metadata = array(), $language = null, $options = array() ) {
	return ST_Sidecar_Publisher::from_config()->enqueue( $s3_key, $job_id, $metadata, $language, $options );
}

/**
 * The stored record of a job, or null when this site has none.
 *
 * @param string|int $job_id The job's id.
 * @return array|null Columns of the job table; metadata and transcript decoded.
 */
function salestrainer_sidecar_get_job( $job_id ) {
	return ST_Sidecar_Job_Store::get( (string) $job_id );
}
