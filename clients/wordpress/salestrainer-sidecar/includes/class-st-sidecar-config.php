<?php
/**
 * Configuration from wp-config constants, named like the sidecar's own environment variables.
 *
 * Each setting may be given with an ST_ prefix, which wins, so a site whose other plugins already
 * define AWS_REGION or SQS_QUEUE_URL for something else can keep them apart. The signing secret is
 * ST_SIDECAR_SECRET or SIDE_CAR_SECRET; like the daemon's, it may hold several comma-separated
 * secrets, and every one signs (one v1= entry each), which is what a rotation needs.
 *
 * @package SalesTrainer_Sidecar
 */

defined( 'ABSPATH' ) || exit;

/**
 * Reads the plugin's settings; nothing is read at include time.
 */
final class ST_Sidecar_Config {

	/**
	 * Setting => constants consulted, first defined and non-empty wins.
	 */
	const NAMES = array(
		'secret'            => array( 'ST_SIDECAR_SECRET', 'SIDE_CAR_SECRET' ),
		'server_token'      => array( 'ST_WP_SERVER_TOKEN', 'WP_SERVER_TOKEN' ),
		'queue_url'         => array( 'ST_SQS_QUEUE_URL', 'SQS_QUEUE_URL' ),
		'region'            => array( 'ST_AWS_REGION', 'AWS_REGION' ),
		'endpoint'          => array( 'ST_AWS_ENDPOINT_URL', 'AWS_ENDPOINT_URL' ),
		'access_key_id'     => array( 'ST_AWS_ACCESS_KEY_ID', 'AWS_ACCESS_KEY_ID' ),
		'secret_access_key' => array( 'ST_AWS_SECRET_ACCESS_KEY', 'AWS_SECRET_ACCESS_KEY' ),
		'session_token'     => array( 'ST_AWS_SESSION_TOKEN', 'AWS_SESSION_TOKEN' ),
	);

	/**
	 * Settings a site cannot publish jobs without.
	 */
	const REQUIRED_TO_PUBLISH = array( 'secret', 'queue_url', 'region' );

	/**
	 * The value of one setting, or null when no constant for it is defined (or it is empty).
	 *
	 * @param string $setting A key of NAMES.
	 * @return string|null
	 */
	public static function get( $setting ) {
		foreach ( self::NAMES[ $setting ] as $name ) {
			if ( defined( $name ) && '' !== (string) constant( $name ) ) {
				return (string) constant( $name );
			}
		}
		return null;
	}

	/**
	 * The signing secrets, in order.
	 *
	 * @return string[]
	 */
	public static function secrets() {
		$secrets = array_map( 'trim', explode( ',', (string) self::get( 'secret' ) ) );
		return array_values( array_filter( $secrets, 'strlen' ) );
	}

	/**
	 * Constant names (the unprefixed ones) of the settings publishing needs but lacks.
	 *
	 * @return string[]
	 */
	public static function missing_for_publishing() {
		$missing = array();
		foreach ( self::REQUIRED_TO_PUBLISH as $setting ) {
			if ( null === self::get( $setting ) ) {
				$names     = self::NAMES[ $setting ];
				$missing[] = end( $names );
			}
		}
		return $missing;
	}
}
